"""One config system: dataclasses read from YAML, type-checked by pydantic, bound to argparse.

Every model, training, fine-tuning and pipeline config is a `@dataclass` inheriting `Config`:

- `read_yaml(path)` is the one YAML reader: a mapping, or `NLMError` naming `file:line`.
- `Config.from_dict(data, source)` builds one: unknown keys are an error naming the key (a typo
  never falls back to a default silently), and every value's type is checked by pydantic in
  strict mode (YAML reads `1e-3` as a string: "expected a number"), naming `file:line` and the
  field when the data came from `read_yaml`. `Config.check(source)` is the one name of a
  config's own range checks (subclasses extend it; it type-checks first).
- Sections: a field made with `section(...)` holds a sub-config (torchtitan's composed job
  config: `TrainConfig.optim`, `TrainConfig.scale`). On the user's side (YAML files, RUN/config
  .yaml, flags) a section's fields are flat keys (`lr: 1e-3`, `--lr`), the keys `nlm` has always
  taken; a nested mapping (`optim: {lr: 1e-3}`) is read too.
- `add_config_arguments(parser, cls)` gives every field a flag whose help is the field's
  `metadata["help"]` (write fields with `option(default, "help")`), and
  `args_to_dict(cls, args, base)` lays the flags given over a loaded YAML mapping.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Self

from nlm.errors import NLMError


def option(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:
    """A dataclass field with its help text (and argparse hints) beside it.

    metadata: `flag` (the option string, default `--field-name`), `metavar`, `choices`,
    `type` (a converter for the flag's text, e.g. `parse_size`), `group` (the help's argument
    group), `cli=False` (no flag).
    A list or dict default is copied per instance."""
    meta = {"help": help, **metadata}
    if isinstance(default, list | dict):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type[Config], help: str = "", **defaults: Any) -> Any:
    """A field holding a sub-config, its defaults overridden per owner (e.g. fine-tuning's lr)."""
    return dataclasses.field(
        default_factory=lambda: cls(**copy.deepcopy(defaults)),
        metadata={"help": help, "section": True},
    )


class YamlMapping(dict):
    """A YAML file's top-level mapping; `lines[key]` is the 1-based line of each key."""

    def __init__(self, data: dict[str, Any], path: str, lines: dict[str, int]) -> None:
        super().__init__(data)
        self.path, self.lines = path, lines


def read_yaml(path: str | Path, what: str = "config fields") -> YamlMapping:
    """The mapping in a YAML file (empty file: {}). NLMError naming file:line on bad YAML, a
    missing or non-UTF-8 file, or a top level that is not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise NLMError(f"{path}: no such config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise NLMError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise NLMError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        raise NLMError(f"{where}: invalid YAML ({problem})") from None
    if data is None:
        return YamlMapping({}, str(path), {})
    if not isinstance(data, dict):
        raise NLMError(f"{path}:1: expected a mapping of {what}, got {type(data).__name__}")
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
    return YamlMapping(data, str(path), lines)


def key_values(items: list[str], flag: str) -> dict[str, object]:
    """Repeated `--flag KEY=VALUE` options as a dict; values read as YAML scalars (0.3 -> float,
    true -> bool, 1 -> int), so the config's own checks see typed values."""
    import yaml

    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise NLMError(f"{flag} {item!r}: expected KEY=VALUE")
        result[key.strip()] = yaml.safe_load(value)
    return result


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """A size in bytes: '64M' -> 67108864, '512k', '1G'; plain numbers are bytes.
    argparse.ArgumentTypeError when it is not one (a flag's `type`)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4M, 512k, 1G)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


@dataclasses.dataclass
class Config:
    # pydantic checks instances field by field (strict: no '1e-3' -> 0.001, no true -> 1);
    # an int where a float is declared becomes a float.
    __pydantic_config__: ClassVar[Any] = {"strict": True, "revalidate_instances": "always"}

    # -- dicts -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Nested: a section is a mapping under its name."""
        return dataclasses.asdict(self)

    def flat_dict(self) -> dict[str, Any]:
        """Flat: a section's fields at the top level, as YAML files and flags spell them."""
        result: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if _is_section(field):
                result.update(value.flat_dict())
            else:
                result[field.name] = dataclasses.asdict(value) if _is_config(value) else value
        return _plain(result)

    @classmethod
    def flat_fields(cls) -> list[dataclasses.Field]:
        """Every field as a flat key sees it: a section's fields in the section's place."""
        result = []
        for field in dataclasses.fields(cls):
            if _is_section(field):
                result += _section_class(cls, field).flat_fields()
            else:
                result.append(field)
        return result

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Self:
        """Build from flat keys (or nested sections); NLMError naming the key, its line when
        `data` came from `read_yaml`, and what was expected."""
        lines = getattr(data, "lines", {})
        config = cls._build(dict(data), source, lines)
        return config.typed(source, lines)

    @classmethod
    def _build(cls, data: dict[str, Any], source: str, lines: dict[str, int]) -> Self:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        sections = {n: _section_class(cls, f) for n, f in fields.items() if _is_section(f)}
        owner = {f.name: n for n, sub in sections.items() for f in sub.flat_fields()}
        kwargs: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {name: {} for name in sections}
        for key, value in data.items():
            if key in sections:
                if not isinstance(value, dict):
                    raise NLMError(f"{_where(source, lines, key)}: expected a mapping")
                nested[key].update(value)
            elif key in owner:
                nested[owner[key]][key] = value
            elif key in fields:
                kwargs[key] = value
            else:
                known = ", ".join(sorted([*(set(fields) - set(sections)), *owner]))
                raise NLMError(
                    f"{_where(source, lines, key)}: unknown field '{key}' for {cls.__name__} "
                    f"(known: {known})"
                )
        for name, values in nested.items():
            base = fields[name].default_factory()  # the owner's defaults for this section
            merged = {**base.flat_dict(), **values}
            kwargs[name] = sections[name]._build(merged, source, lines)
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise NLMError(f"{source}: {cls.__name__}: {exc}") from None

    def typed(self, source: str = "config", lines: dict[str, int] | None = None) -> Self:
        """This config with every value checked against its type annotation (pydantic, strict).

        Raises NLMError "SOURCE[:LINE] (field 'NAME'): expected a number, got '1e-3'"."""
        import pydantic

        try:
            return _adapter(type(self)).validate_python(self)
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            name = _field_name(type(self), error["loc"])
            expected = _expected(error)
            got = error.get("input")
            raise NLMError(
                f"{_where(source, lines or {}, name)} (field '{name}'): {expected}, got {got!r}"
            ) from None

    def check(self, source: str = "config") -> Self:
        """Types, then (in subclasses) ranges: the one validation entry point of every config."""
        return self.typed(source)

    def replace(self, **changes: Any) -> Self:
        """A copy with fields changed; a section's fields may be named flat (`lr=...`)."""
        names = {f.name: f for f in dataclasses.fields(self)}
        direct = {k: v for k, v in changes.items() if k in names}
        rest = {k: v for k, v in changes.items() if k not in names}
        for name, field in names.items():
            if not _is_section(field) or not rest:
                continue
            sub = getattr(self, name)
            mine = {k: rest.pop(k) for k in [*rest] if k in {f.name for f in sub.flat_fields()}}
            if mine:
                direct[name] = sub.replace(**mine)
        if rest:
            raise TypeError(f"{type(self).__name__} has no field {sorted(rest)[0]!r}")
        return dataclasses.replace(self, **direct)

    # -- files -------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "config") -> Self:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NLMError(f"{source}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        return cls.from_dict(data, source=source)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load_json(cls, path: str | Path) -> Self:
        return cls.from_json(Path(path).read_text(encoding="utf-8"), source=str(path))

    def save_yaml(self, path: str | Path) -> None:
        """The flat keys, as `--config` reads them; written through a temporary name so a
        half-written config never looks complete."""
        import yaml

        from nlm.files import write_text

        write_text(path, yaml.safe_dump(self.flat_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | Path) -> Self:
        """Read (not range-checked: call `check`); flat keys or nested sections."""
        return cls.from_dict(read_yaml(path), source=str(path))


# --- argparse binding ----------------------------------------------------------------------------


def add_config_arguments(
    parser: argparse.ArgumentParser | Any,
    cls: type[Config],
    *,
    exclude: tuple[str, ...] = (),
    defaults: Config | None = None,
) -> None:
    """One flag per field of `cls` (a section's fields in an argument group of their own).

    Every flag defaults to None (= not given), so `args_to_dict` lays only the given ones over
    the YAML file; the help ends with the field's default. bool: --x / --no-x; list[float]:
    comma-separated; list[str]: one or more values (repeatable); dict[str, X]: repeatable
    KEY=VALUE; `T | None`: T. `defaults`: the instance whose values the help shows (a section's
    owner sets its own)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in exclude or field.metadata.get("cli") is False:
            continue
        if _is_section(field):
            sub = _section_class(cls, field)
            group = parser.add_argument_group(field.metadata.get("help") or field.name)
            own = field.default_factory()  # the owner's defaults for this section
            add_config_arguments(group, sub, exclude=exclude, defaults=own)
            continue
        default = getattr(defaults, field.name) if defaults is not None else _default_of(field)
        target = parser
        if "group" in field.metadata:  # argument groups of the help, e.g. prepare's "input"
            title = field.metadata["group"]
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        _add_flag(target, field, hints[field.name], default)


def args_to_dict(
    cls: type[Config], args: argparse.Namespace, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`base` (a YAML mapping, kept with its line numbers) with the flags that were given on
    top: a dict field's KEY=VALUE pairs are merged into the file's mapping."""
    data = base if base is not None else {}
    for field in cls.flat_fields():
        value = getattr(args, field.name, None)
        if value is None:
            continue
        if _origin(_bare(typing.get_type_hints(_owner(cls, field.name))[field.name])) is dict:
            value = {**(data.get(field.name) or {}), **key_values(value, _flag(field))}
        data[field.name] = value
    return data


def _add_flag(parser: Any, field: dataclasses.Field, hint: Any, default: Any) -> None:
    meta = field.metadata
    text = meta.get("help") or field.name
    if default not in (None, "", [], {}):
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text += f" (default: {shown})"
    kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": text.replace("%", "%%")}
    for key in ("metavar", "choices"):
        if key in meta:
            kwargs[key] = meta[key]
    kind = _bare(hint)
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif _origin(kind) is dict:
        kwargs.update(action="append", metavar=meta.get("metavar", "KEY=VALUE"))
    elif _origin(kind) is list:
        (item,) = typing.get_args(kind)
        if item is str:
            kwargs.update(action="extend", nargs="+")
        else:
            kwargs["type"] = _comma_list(item)
    else:
        kwargs["type"] = meta.get("type", kind)
    parser.add_argument(_flag(field), **kwargs)


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _comma_list(item: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [item(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {item.__name__} values separated by commas, got {text!r}"
            ) from None

    parse.__name__ = f"{item.__name__} list"
    return parse


# --- helpers -----------------------------------------------------------------------------------


@functools.cache
def _adapter(cls: type) -> Any:
    import pydantic

    return pydantic.TypeAdapter(cls)


def _is_section(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get("section"))


def _is_config(value: Any) -> bool:
    return isinstance(value, Config)


def _section_class(cls: type, field: dataclasses.Field) -> type[Config]:
    return typing.get_type_hints(cls)[field.name]


def _owner(cls: type[Config], name: str) -> type[Config]:
    """The (sub-)config class that declares the flat field `name`."""
    for field in dataclasses.fields(cls):
        if _is_section(field):
            sub = _section_class(cls, field)
            if name in {f.name for f in sub.flat_fields()}:
                return _owner(sub, name)
    return cls


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _origin(kind: Any) -> Any:
    return typing.get_origin(kind)


def _bare(hint: Any) -> Any:
    """`T | None` -> T."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _field_name(cls: type, loc: tuple[Any, ...]) -> str:
    """The flat key a pydantic error location points at: ('optim', 'lr') -> 'lr'."""
    current: Any = cls
    for part in loc:
        if not isinstance(part, str):
            break
        fields = {f.name: f for f in dataclasses.fields(current)} if current else {}
        field = fields.get(part)
        if field is None:
            break
        if not _is_section(field):
            return part
        current = _section_class(current, field)
    return next((p for p in reversed(loc) if isinstance(p, str)), "?")


_EXPECTED = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
}


def _expected(error: dict[str, Any]) -> str:
    return _EXPECTED.get(error["type"], error["msg"][:1].lower() + error["msg"][1:])


def _where(source: str, lines: dict[str, int], key: str) -> str:
    line = lines.get(key)
    return f"{source}:{line}" if line else source


def _plain(data: Any) -> Any:
    """Tuples as lists, so the dict dumps as plain YAML."""
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_plain(v) for v in data]
    return data
