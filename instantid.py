"""InstantID's IdentityNet and pose control (public names; the code lives in utils/engine/identity/)."""
from utils.engine.identity.instantid import identity_tokens  # noqa: F401
from utils.engine.identity.pose import (POSE_CHOICES, POSE_PRESETS, POSE_STRENGTH_RANGE, auto_layout,  # noqa: F401
                                        draw_kps, normalise_selfie_kps, parse_pose, place, pose_image,
                                        preset_layout, resolve_pose)


def __getattr__(name: str):
    # IdentityNet subclasses a diffusers class: built on first use, so importing this module stays light.
    if name == "IdentityNet":
        from utils.models.identitynet import identity_net_class
        return identity_net_class()
    raise AttributeError(name)
