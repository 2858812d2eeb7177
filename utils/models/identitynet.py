"""InstantID's IdentityNet: the ControlNet that reads the identity tokens, not the text, as cross-attention input.

diffusers core has the ControlNet pipeline but not this class: the loader builds the pipeline's controlnet
from it (``load``), and the generator hands it the tokens for one call (``instantid.identity_tokens``)."""
from __future__ import annotations

import functools


@functools.cache
def identity_net_class():
    """The class, built on first use: importing this module must not import diffusers (nothing heavy at import)."""
    from diffusers import ControlNetModel

    class IdentityNet(ControlNetModel):
        """InstantID's ControlNet: reads the identity tokens, not the text, as cross-attention input.

        Set ``identity_tokens`` ([batch, 16, C], the batch the pipeline runs: negatives then positives under
        CFG) before a pipeline call and clear it after; a call without tokens is an error rather than a
        silent fall-back to the text."""

        identity_tokens = None

        def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
            tokens = self.identity_tokens
            if tokens is None:
                raise RuntimeError("IdentityNet called without identity tokens")
            if tokens.shape[0] != sample.shape[0]:
                raise RuntimeError(f"IdentityNet: {tokens.shape[0]} identity token rows for a batch of "
                                   f"{sample.shape[0]}")
            return super().forward(sample, timestep, tokens.to(sample.dtype), *args, **kwargs)

    IdentityNet.__name__ = IdentityNet.__qualname__ = "IdentityNet"
    return IdentityNet
