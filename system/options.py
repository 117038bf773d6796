"""Options a registered member (an objective, an adapter method) declares in its own file.

A member writes a small pydantic model of its options, with a one-line description per
field and its own validators, and hands it to its register decorator:

    class SimclrOptions(Options):
        temperature: float = Field(0.2, gt=0, description="NT-Xent temperature",
                                   json_schema_extra=PERTURBABLE)

    @register_objective("simclr", options=SimclrOptions, views=2)

system/config.py composes every member's options into its flat section (`objective.temperature`,
`finetune.energy`), so users' keys never name the member. Members that read the same option share
one options class (finetune.rank: every rank method); two classes declaring one key is an error.
The markers below are read by config.py and the sweep, so no list of keys is written out by hand:

- PERTURBABLE: PBT may change the key mid-run (a trial going on from another one's checkpoint):
  optimizer and loss settings, never what shapes the weights, the optimizer state or the data.
- perturbable(avoid=v): the same, except to or from `v` (a value that regroups the optimizer's
  parameters, so a cloned checkpoint's optimizer state would not load).
- EXCLUSIVE: the key set to a non-default value is refused, in one line, when the chosen member
  does not declare it (`finetune.train_norms: needs finetune.method svfit, not lora`). For options
  whose silent neglect would mislead (a closed-form fit that quietly trains by SGD); the others are
  ignored by members that do not read them, so one preset serves every method and a sweep over
  methods can fix any of them. An objective's are checked against `objective.name`, though a
  finetune trains `supervised` whatever that says: objectives' options stay non-exclusive.
"""

from __future__ import annotations

import copy

from pydantic import BaseModel, ConfigDict, ValidationError, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError

PERTURBABLE = {"perturbable": True}
EXCLUSIVE = {"exclusive": True}


def perturbable(avoid) -> dict:
    """PBT may change the key, but never to or from `avoid`."""
    return {"perturbable": True, "avoid": avoid}


def marks(info: FieldInfo) -> dict:
    """The markers above on a field, {} when it has none."""
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


class Options(BaseModel):
    """Base of a member's options: a typo in a key is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


def compose_section(base: type[BaseModel], section: str, choice: str, kind: str, members: dict) -> type:
    """`base` plus every member's options: the flat config section `section` (e.g. "finetune").

    `base` holds the keys every member shares, `choice` the one naming the member (its value must be
    a registered name: `kind` names one in messages); `members` is {name: options class or None}.
    Each option's description ends with the members that read it; the choice's lists them all.
    The options' own validators come along by inheritance.
    """
    owners, declared = _owners(base, section, members)
    fields = {choice: _described(base.model_fields[choice], ": " + " | ".join(members))}
    for field, names in owners.items():
        fields[field] = _described(declared[field].model_fields[field], f" [{', '.join(names)}]")
    classes = list(dict.fromkeys(options for options in members.values() if options is not None))
    leaves = [c for c in classes if not any(o is not c and issubclass(o, c) for o in classes)]

    def known(cls, value):
        if value not in members:
            raise _custom(f"unknown {kind} {value!r} (known: {', '.join(sorted(members))})")
        return value

    def exclusive(self):
        chosen = getattr(self, choice)
        for field, names in owners.items():
            info = type(self).model_fields[field]
            value = getattr(self, field)
            if (
                marks(info).get("exclusive")
                and chosen not in names
                and value != info.get_default(call_default_factory=True)
            ):
                message = f"needs {section}.{choice} {' or '.join(names)}, not {chosen}"
                # Raised here, after every field is in, so the keys' order in the file does not matter.
                error = InitErrorDetails(type=_custom(message), loc=(field,), input=value)
                raise ValidationError.from_exception_data(type(self).__name__, [error])
        return self

    validators = {
        "_known_member": field_validator(choice)(known),
        "_options_of_the_chosen_member": model_validator(mode="after")(exclusive),
    }
    name = f"{section.title()}Config"
    return create_model(
        name,
        __base__=(*reversed(leaves), base),
        __module__=base.__module__,
        __validators__=validators,
        **fields,
    )


def _owners(base: type[BaseModel], section: str, members: dict) -> tuple[dict, dict]:
    """({option: members reading it}, {option: the options class declaring it}); one class per key."""
    owners: dict[str, list[str]] = {}
    declared: dict[str, type] = {}
    for member, options in members.items():
        for field in options.model_fields if options is not None else ():
            origin = next(c for c in options.__mro__ if field in vars(c).get("__annotations__", {}))
            if field in base.model_fields or declared.setdefault(field, origin) is not origin:
                other = "the shared keys" if field in base.model_fields else declared[field].__name__
                raise TypeError(
                    f"{section}.{field}: declared by {origin.__name__} ({member}) and by {other}; "
                    "members that read one key share one options class"
                )
            owners.setdefault(field, []).append(member)
    return owners, declared


def _described(info: FieldInfo, suffix: str) -> tuple:
    info = copy.copy(info)
    info.description = f"{info.description or ''}{suffix}"
    return info.annotation, info


def _custom(message: str) -> PydanticCustomError:
    # The message as a context value: braces in it (a dict's repr) are not a template.
    return PydanticCustomError("config", "{message}", {"message": message})
