"""The engine's public names and the command line (the code lives in utils/engine/ and utils/cli/).

    gen = DigitalTwinGenerator(settings); gen.setup()
    identity = gen.build_identity(crops, embeddings, face_model=...)     # once per session and model
    result = gen.generate(GenerationRequest.from_dict(payload, settings).with_identity(identity))

CLI (whole path: faces -> identity -> images, through the service's JobRunner; and a likeness report)::

    python generate_twin.py --selfies DIR --prompt "a portrait in a forest" --out DIR [--num-images 2] [--seed 1]
    python generate_twin.py evaluate --selfies DIR --images DIR [--json report.json]
    python generate_twin.py provenance FILE... [--trust-anchors PEM] [--json]   # C2PA state, source, watermark
    python generate_twin.py evaluate --compare-modes --selfies DIR --twin-lora TWIN_DIR [--seeds 1 2]
"""
import sys

from utils.cli.evaluate import evaluate  # noqa: F401
from utils.cli.generate import CLI_FLAG_ALIASES, add_request_flags, cli_flag, main  # noqa: F401
from utils.engine.generator import DigitalTwinGenerator  # noqa: F401
from utils.engine.previews import latent_preview_jpeg, preview_steps  # noqa: F401
from utils.engine.request import (REQUEST_FIELDS, REQUEST_KEYS, GenerationRequest, GenerationResult,  # noqa: F401
                                  published_options)
from utils.engine.tuning import (ASPECT_RATIOS, BASE_NEGATIVE, DEFAULT_STYLE, FAST_FALLBACK, MAX_CANDIDATES,  # noqa: F401
                                 MAX_IMAGES, MAX_SEED, QUALITY_MODES, VARIANT_TUNING, default_identity_strength,
                                 fast_fallback_row, preset_size, quality_row, style_library)

if __name__ == "__main__":
    sys.exit(main())
