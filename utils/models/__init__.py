"""The model weights: where they live, how they are fetched, loaded, checked, and the tiny stand-in built.

One module per thing, read bottom-up (none of them imports torch or diffusers at import time):

* ``kinds``       which family a weight file is (sdxl | flux) from its key names alone.
* ``layout``      folder and file names, the hub repos, and ``model_layout``: settings -> ``ModelLayout`` (SDXL)
                  or ``FluxLayout``, the one answer to "which folder holds what" for the profile in use;
                  ``list_base_models``: the base models found, of both families.
* ``flux_configs/`` the real hub configs of FLUX.1-dev and -schnell and InfiniteYou's InfuseNet (parameter counts, benches).
* ``download``    fetching the sdxl profile's repos, FLUX.1's diffusers folders and the restoration models.
* ``adapters``    the IP-Adapter weight files as the loader reads them (keys and shapes per variant).
* ``identitynet`` InstantID's IdentityNet (the ControlNet that reads the identity tokens).
* ``load``        ``LoadedModels``, building the SDXL pipeline from a ``ModelLayout``, device / dtype choice,
                  schedulers, quiet library logging, the CUDA speed switches.
* ``single_file`` the original (LDM) key names of a single-file SDXL checkpoint.
* ``flux_memory`` TWIN_FLUX_MEMORY: full / quantized / offload, decided from GPU facts (testable alone).
* ``flux_load``   the FLUX pipeline for a ``FluxLayout`` (folder or single-file transformer, memory mode, LoRAs).
* ``tiny``, ``tiny_flux``, ``tiny_tokenizers``  the deterministic tiny folder: SDXL and FLUX (imports the
                  readers' names and layouts; no reader imports it).
* ``filecheck``, ``lora_check``, ``onnx_check``, ``verify``, ``flux_verify``  the preflight: every weight
                  file's header against what the code will build from the folder's own configs.
* ``startup``     the entry points: the layout made ready (the tiny folder built when needed), then loaded
                  (``load_models``) or checked (``verify``).
* ``cli``         ``python model_loader.py download | make-tiny | check | verify``.
"""
