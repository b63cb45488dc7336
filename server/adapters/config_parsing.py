"""adapter_config.json, parsed with pydantic against the allowlist of the kind that serves it.

Every byte of an uploaded adapter is untrusted, so the parser is strict:

- the JSON is size-capped (MAX_CONFIG_BYTES, the one cap), must be an object and must not repeat a key;
- some registered kind must claim it (else UnsupportedAdapterError listing the served peft_types);
- fields that name code to import (`auto_map`, a non-default `megatron_core`, a custom `auto_mapping`,
  `trust_remote_code`, ...) are refused with AdapterValidationError;
- any field that PEFT 0.21.2 does not write for that type is refused (AdapterValidationError naming it);
- a well-formed value that changes the forward pass in a way the engine does not implement (DoRA,
  LoRA bias, modules_to_save, Activated LoRA, ...) is refused with UnsupportedAdapterError naming the
  field and the value;
- init-time-only fields (dropout, AdaLoRA's schedule, EVA/CorDA configs, prompt-init text, ...) are
  accepted and ignored: they do not change what the saved weights compute.

What the config models share is config.py; which kind claims a config is kind.py's registry.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from adapterserve.server.adapters.config import (
    REMOTE_CODE_FIELDS,
    REMOTE_CODE_HINT,
    PeftConfigBase,
    shortened,
)
from adapterserve.server.adapters.kind import AdapterKind, kind_for_config, served_peft_types
from adapterserve.server.errors import AdapterValidationError, UnsupportedAdapterError

MAX_CONFIG_BYTES = 64 << 10  # a real adapter_config.json is ~1-2 KiB


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise AdapterValidationError(f"adapter_config.json: key {key!r} appears twice")
        out[key] = value
    return out


def _load_json(data: bytes | str) -> Any:
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterValidationError(
            f"adapter_config.json is {len(raw)} bytes; at most {MAX_CONFIG_BYTES} bytes are accepted"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise AdapterValidationError(
            f"adapter_config.json is not UTF-8 ({err.reason} at byte {err.start})"
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise AdapterValidationError(
            f"adapter_config.json is not valid JSON: {err.msg} (line {err.lineno})"
        ) from None
    except RecursionError:
        raise AdapterValidationError("adapter_config.json is nested too deeply") from None


def _refuse_constant(name: str) -> Any:
    raise AdapterValidationError(f"adapter_config.json: {name} is not a valid JSON number")


def _describe(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error.get("loc", ())]
    field = ".".join(loc) or "(root)"
    if error.get("type") == "extra_forbidden":
        return f"unknown field {field!r} is not accepted"
    return f"field {field!r}: {error.get('msg', 'invalid')}"


def parse_adapter_config(data: bytes | str | dict[str, Any]) -> PeftConfigBase:
    """Parse and check an adapter_config.json (bytes/str) or an already-decoded dict (see resolve_config)."""
    return resolve_config(data)[1]


def resolve_config(data: bytes | str | dict[str, Any]) -> tuple[AdapterKind, PeftConfigBase]:
    """The kind that serves an adapter_config.json and the config parsed by that kind's model.

    Raises AdapterValidationError (malformed, unknown or remote-code fields) or UnsupportedAdapterError
    (a peft_type or field value the engine does not serve); messages name the field and value.
    """
    obj = dict(data) if isinstance(data, dict) else _load_json(data)
    if not isinstance(obj, dict):
        raise AdapterValidationError(f"adapter_config.json must be a JSON object, not {type(obj).__name__}")

    for key in obj:
        if not isinstance(key, str):
            raise AdapterValidationError(f"adapter_config.json: key {key!r} is not a string")
        if key in REMOTE_CODE_FIELDS or REMOTE_CODE_HINT.search(key):
            raise AdapterValidationError(
                f"adapter_config.json: field {key!r} asks to import or run code; remote code is refused"
            )

    peft_type = obj.get("peft_type")
    if peft_type is None:
        raise AdapterValidationError("adapter_config.json: field 'peft_type' is missing")
    if not isinstance(peft_type, str):
        raise AdapterValidationError(
            f"adapter_config.json: field 'peft_type' must be a string, got {peft_type!r}"
        )
    kind = kind_for_config(obj)
    if kind is None:
        served = ", ".join(served_peft_types())
        raise UnsupportedAdapterError(
            f"adapter_config.json: peft_type {peft_type[:64]!r} is not served (served: {served})"
        )

    try:
        config = kind.configs[peft_type].model_validate(obj)
    except ValidationError as err:
        errors = err.errors(include_url=False, include_input=False)
        # Unknown fields first: they are the most precise reason.
        errors.sort(key=lambda e: e.get("type") != "extra_forbidden")
        detail = "; ".join(_describe(e) for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise AdapterValidationError(f"adapter_config.json ({peft_type}): {detail}{more}") from None

    for field, value, why in config.remote_code():
        raise AdapterValidationError(
            f"adapter_config.json ({peft_type}): field {field!r} = {shortened(value)} is refused: {why}"
        )
    for field, value, why in config.unsupported():
        raise UnsupportedAdapterError(
            f"adapter_config.json ({peft_type}): {field} = {shortened(value)} is not supported: {why}"
        )
    return kind, config
