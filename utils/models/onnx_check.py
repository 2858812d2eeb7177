"""The preflight of the ONNX models (graph headers only, no session): the InsightFace face pack and the face
restoration exports."""
from __future__ import annotations

from pathlib import Path

from utils.models.filecheck import FileCheck


def verify_face_pack(folder: Path) -> list[FileCheck]:
    """The InsightFace pack: a detector (SCRFD: >= 5 outputs) and a 512-d ArcFace recogniser (112x112 in),
    found by the same input/output routing insightface uses. Graph headers only (no session)."""
    from utils.faces.backends import resolve_pack_dir
    inner = resolve_pack_dir(folder)
    note = f" (nested {folder.name}/{folder.name}/ accepted; to flatten: mv {inner}/*.onnx {folder}/)" if inner != folder else ""
    files = sorted(inner.glob("*.onnx")) if inner.is_dir() else []
    if not files:
        return [FileCheck(str(folder), "missing", "no .onnx files (put the antelopev2 pack here, or set "
                                                  "TWIN_INSIGHTFACE_MODEL_DIR)")]
    import onnx
    found: dict[str, Path] = {}
    out: list[FileCheck] = []
    for f in files:
        try:
            m = onnx.load(str(f), load_external_data=False)
        except Exception as e:
            out.append(FileCheck(str(f), "corrupt", f"{type(e).__name__}: {str(e)[:120]}"))
            continue
        ins = [[d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in m.graph.input]
        outs = [[d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in m.graph.output]
        if len(outs) >= 5:
            found.setdefault("detection", f)
        elif ins and ins[0][2:4] == [112, 112]:
            if outs and outs[0][-1] != 512:
                out.append(FileCheck(str(f), "wrong_shape", f"recognition output {outs[0]}, expected [1, 512]"))
                continue
            found.setdefault("recognition", f)
    for task in ("detection", "recognition"):
        if task in found:
            out.append(FileCheck(str(found[task]), "ok", task + note))
        elif not any(c.status == "corrupt" or c.status == "wrong_shape" for c in out):
            out.append(FileCheck(str(inner), "missing", f"no {task} model among {[f.name for f in files]}"))
    return out


def verify_restore_models(folder: Path) -> list[FileCheck]:
    """The face restoration ONNX models that are present (each is optional: restore_faces asks for one by
    name): graph inputs/outputs as OnnxRestoreModel needs them (one 4-D 3-channel image input, a second
    input exactly when the model takes a fidelity weight, an output). ONNX has no header: the protobuf is
    parsed, the weights are not run."""
    from utils.faces.restore import RESTORE_MODELS, download_command
    out = []
    for name, spec in RESTORE_MODELS.items():
        f = folder / spec.filename
        rel = f"{folder.name}/{spec.filename}"
        if not f.is_file():
            out.append(FileCheck(rel, "absent", f"optional: restore_model={name} unavailable ({download_command(name)})"))
            continue
        import onnx
        try:
            m = onnx.load(str(f), load_external_data=False)
        except Exception as e:
            out.append(FileCheck(rel, "corrupt", f"{type(e).__name__}: {str(e)[:120]}"))
            continue
        init = {i.name for i in m.graph.initializer}
        ins = [(i.name, [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim])
               for i in m.graph.input if i.name not in init]
        images = [(n, d) for n, d in ins if len(d) == 4]
        if len(images) != 1 or not m.graph.output:
            out.append(FileCheck(rel, "wrong_shape", f"expected one 4-D image input and an output, found inputs {ins}"))
            continue
        dims = images[0][1]
        if dims[1] != 3 or any(isinstance(d, int) and d and d != spec.size for d in dims[2:]):
            out.append(FileCheck(rel, "wrong_shape", f"image input {images[0][0]!r} is {dims}, expected [1, 3, "
                                                     f"{spec.size}, {spec.size}]"))
            continue
        if (len(ins) > 1) != spec.has_fidelity:
            out.append(FileCheck(rel, "wrong_shape", f"{name} {'takes' if spec.has_fidelity else 'takes no'} a "
                                                     f"fidelity input; the file's inputs are {[n for n, _ in ins]}"))
            continue
        out.append(FileCheck(rel, "ok", f"{name}, input {images[0][0]} {dims}" + (", fidelity input" if len(ins) > 1 else "")))
    return out
