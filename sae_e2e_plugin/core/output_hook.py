"""A transcoder's second hook: where its output replaces the MLP's (``hook_name_out``).

An SAE reads and replaces one activation (``hook_name``). A transcoder reads the MLP's input at
``hook_name`` and replaces the MLP's output at ``hook_name_out``; a splice plan carries both
(``SplicePlan.write_hook`` is the one replaced). The checks here hold for either model family
(``core.splice`` plans a ``HookedTransformer``, ``core.hf_splice`` a Hugging Face model): the
output hook fires after the input hook and inside the same block, one MLP replaced. So the shared
prefix that ends at the input's block, and the clean run through that block, hold both the
transcoder's input and its target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

EXAMPLE = (
    "e.g. hook_name='blocks.6.ln2.hook_normalized', hook_name_out='blocks.6.hook_mlp_out' "
    "(on a Hugging Face model 'model.layers.6.post_attention_layernorm' → 'model.layers.6.mlp')"
)


def check_output_hook(
    hook_name: str,
    hook_name_out: str,
    order: Sequence[str],
    block_of: Callable[[str], int | None],
) -> None:
    """Refuse an output hook that does not fire after ``hook_name`` in the same block.

    ``order``: hook names in firing order; ``block_of``: the block (decoder layer) a hook is in.
    """
    if list(order).index(hook_name_out) <= list(order).index(hook_name):
        raise ValueError(
            f"hook_name_out={hook_name_out!r} runs at or before hook_name={hook_name!r}; a "
            "transcoder reads the MLP's input at hook_name and replaces the MLP's output at "
            f"hook_name_out, which must run later in the same block: {EXAMPLE}."
        )
    block_in, block_out = block_of(hook_name), block_of(hook_name_out)
    if block_in is None or block_in != block_out:
        raise ValueError(
            f"hook_name={hook_name!r} (block {block_in}) and hook_name_out={hook_name_out!r} "
            f"(block {block_out}) are not in the same block; a transcoder replaces one block's "
            f"MLP, so both hooks must be inside that block: {EXAMPLE}."
        )


def check_output_width(hook_name_out: str, width: int, d_out: int | None, where: str) -> None:
    """Refuse ``sae.d_out`` that is not the width of the activation at ``hook_name_out``.

    ``where``: "hook" (a ``HookedTransformer``'s hook point) or "module" (a Hugging Face module).
    """
    if d_out is not None and width != d_out:
        raise ValueError(
            f"sae.d_out is {d_out}, but the activation at hook_name_out={hook_name_out!r} has "
            f"width {width}. Set sae.d_out={width} or choose a {where} of width {d_out}."
        )
