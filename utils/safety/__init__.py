"""Safety and provenance (docs/SAFETY.md): what the service owes the people in its pictures.

- ``provenance``: C2PA Content Credentials (``c2pa-python``) signed onto every PNG / JPEG written, and
  the reader behind ``generate_twin.py provenance`` (valid / untrusted / tampered / absent).
- ``watermark``: an invisible DWT-DCT-SVD mark (invisible-watermark's ``dwtDctSvd`` format, written with
  numpy and PyWavelets) that survives metadata stripping and JPEG re-encoding.
- ``classifier``: the NSFW image classifier (a transformers ViT; stand-in, download spec, header check).
- ``terms``: the explicit-term list that refuses prompts when a face identity is used.
- ``policy``: pure decisions: a score and the mode give a verdict; selfie ages give the session's gate.

Nothing heavy is imported here: each module imports its library (c2pa, cryptography, pywt,
torch, transformers) inside the functions that need it.
"""
