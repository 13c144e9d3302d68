"""The key check of an LLM: listing its provider's models through the SDK, and what each failure says.

Both SDKs raise alike (a status error, a timeout or connection error, their base error) and read the answer
only when asked to parse it, without checking its shape: one check serves both."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from kubechain.llm.base import credentials_error, model_list_error
from kubechain.llm.deadline import AnswerTooLarge, answer_too_large


class SDKErrors(NamedTuple):
    """An SDK's exception classes: an answered status, a call not answered, and the base of all."""

    status: type[Exception]
    unanswered: tuple[type[Exception], ...]
    base: type[Exception]


def check_model_list(
    list_models: Callable[[], Any], errors: SDKErrors, *, api_key: str, not_found_hint: str = ""
) -> None:
    """Lists the models (``list_models``: the SDK's raw-response call) and raises the LLMError its failure
    means: a status the key check judges (credentials_error), a call not answered, or an answer that is
    no model list (HTML from a web UI at the base URL, one too large). ``api_key``: the key sent, cut out
    of what the endpoint said before that is shortened."""
    try:
        answer = list_models()
    except errors.status as exc:
        status_code = getattr(exc, "status_code", None)  # both SDKs' status errors carry it
        raise credentials_error(status_code, exc, api_key=api_key, not_found_hint=not_found_hint) from exc
    except AnswerTooLarge as exc:  # raised through the SDK as it is (openai) ...
        raise model_list_error(None, exc, api_key=api_key) from exc
    except errors.unanswered as exc:
        too_large = answer_too_large(exc)  # ... or as the cause of a connection error (anthropic)
        if too_large is not None:
            raise model_list_error(None, too_large, api_key=api_key) from exc
        raise credentials_error(None, exc, api_key=api_key) from exc
    except errors.base as exc:
        raise model_list_error(None, exc, api_key=api_key) from exc
    try:
        answer.parse()  # the SDK reads the answer only here, without checking its shape
    except (errors.base, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise model_list_error(answer.headers.get("content-type"), exc, api_key=api_key) from exc
