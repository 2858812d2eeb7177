"""A session's identity for an engine: built from the face features the session stored at upload, cached
with the session, built again when the active identity method or base model is another one.

This is what lets an API node hold no diffusion model: it validates the selfies and stores their face
features; the process that holds the engine (the job thread's generator, a GPU worker) builds the identity
the first time a job of that session runs on that model. In local mode the upload builds it right away
(``build``), so an upload that cannot make an identity fails at upload, as it always did.
"""
from __future__ import annotations

import logging

from utils import errors
from utils.contracts import Storage

log = logging.getLogger("twin.identity")


class Identities:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def for_engine(self, engine, session_id: str):
        """The session's identity for ``engine``'s active model: a cached one that fits, else one built now
        from the stored face features (and cached); None when the active model has no identity method (FLUX
        without infiniteyou: the job runs without identity conditioning and its metadata says so; the cached
        identities stay for a switch back). Conflict (409) names what a rebuild would need."""
        for path in self.storage.identity_paths(session_id):
            try:
                identity = engine.identity_type.load(path)
                engine.check_identity(identity)
                return identity
            except errors.TwinError:
                continue   # another method's / model's identity, or an unreadable file: not this one
        faces = self.storage.session_faces(session_id)
        try:
            identity = _encode(engine, faces.crops, faces.embeddings, faces.face_model, faces.identity_inputs())
        except errors.InvalidRequest as e:
            raise errors.Conflict(f"this session's identity cannot be built for the active model: {e.message}",
                                  code="identity_mismatch") from None
        if identity is None:
            return None
        self.storage.save_identity(session_id, identity)
        log.info("identity built for the active model", extra={"session_id": session_id})
        return identity


def build_identity(engine, report):
    """The identity of a fresh upload (the face service's report), for ``engine``'s active model (None when it
    has no identity method: the session keeps its face features, and the identity is built on first use by
    a model that has one)."""
    accepted = report.accepted
    return _encode(engine, [a.crop for a in accepted], [a.embedding for a in accepted], report.model_name,
                   report.identity_inputs())


def _encode(engine, crops, embeddings, face_model, inputs):
    try:
        return engine.build_identity(crops, embeddings, face_model=face_model, **inputs)
    except BaseException as e:
        if not isinstance(e, errors.TwinError) and errors.is_oom(e):  # the image encoder runs on the GPU
            errors.empty_cuda_cache()
            raise errors.OutOfMemory("the GPU ran out of memory encoding the selfies; retry shortly",
                                     headers={"Retry-After": "10"}) from None
        raise

