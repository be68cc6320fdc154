"""Token-id input (completions `prompt`, embeddings `input` as ids): checked against the model's own
vocabulary before any engine sees them, since llama.cpp reads an id beyond its vocabulary out of bounds."""

from __future__ import annotations

from collections.abc import Sequence

from core.errors import BadRequest


def checked_ids(ids: Sequence[int], n_vocab: int, param: str = "prompt") -> list[int]:
    """`ids` as a list, or BadRequest naming the first id outside [0, n_vocab)."""
    if not ids:
        raise BadRequest(f"'{param}' holds no token ids", param=param)
    for i in ids:
        if not 0 <= i < n_vocab:
            raise BadRequest(f"'{param}' holds token id {i}, outside this model's vocabulary of {n_vocab}",
                             param=param)
    return list(ids)


def continuation_ids(full: Sequence[int], without: Sequence[int]) -> list[int]:
    """The ids of a resumed request's continuation: the prompt's parts are tokenised one by one and
    the continuation is the last part, so its ids are what follows the prompt tokenised without it."""
    if list(full[: len(without)]) != list(without):
        raise ValueError("the prompt without its continuation is not a prefix of the prompt")
    return list(full[len(without):])
