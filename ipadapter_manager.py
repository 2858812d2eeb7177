"""Identity adapters (public names; the code lives in utils/engine/identity/)."""
from utils.choices import ARCFACE_VARIANTS, IDENTITY_COMBINES as COMBINES, IDENTITY_VARIANTS as VARIANTS  # noqa: F401
from utils.engine.identity.adapters import AdapterManager  # noqa: F401
from utils.engine.identity.session import FORMAT, SessionIdentity, combine_embeds  # noqa: F401
