"""A minimal stand-in for ComfyUI's V3 node API (`comfy_api.latest`: io, ui, ComfyExtension).

Used ONLY when ComfyUI is not importable at all (unit tests in CI, scripting the nodes from plain
Python); inside ComfyUI `compat.py` imports the real API and this module is never loaded. It
implements exactly the subset the VARE nodes use, with the same names, arguments and
`INPUT_TYPES()` layout as the real `io` module (ComfyUI 0.3.6x), so that:

    from nodes.compat import io
    MyNode.execute(prompt="a red circle", ...)      # -> io.NodeOutput, .args holds the outputs
    MyNode.INPUT_TYPES()                           # {"required": {id: (type, options)}, ...}
    MyNode.validate_inputs(cfg="3,x")              # -> True or the message ComfyUI would show

`ui.PreviewImage` keeps the image tensor (no file is written) so tests can inspect it.
tests/test_comfy_e2e.py checks that this layout matches the real server's /object_info.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from types import SimpleNamespace
from typing import Any

STANDIN = True


def _prune(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class _Input:
    io_type = "*"
    widget = False

    def __init__(self, id: str, display_name: str = None, optional: bool = False,
                 tooltip: str = None, lazy: bool = None, **extra):
        self.id, self.display_name, self.optional = id, display_name, optional
        self.tooltip, self.lazy, self.extra = tooltip, lazy, extra

    def as_dict(self) -> dict:
        return _prune({"display_name": self.display_name, "tooltip": self.tooltip,
                       "lazy": self.lazy, **self.extra})


class _Output:
    io_type = "*"

    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None,
                 is_output_list: bool = False):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip
        self.is_output_list = is_output_list


def _comfy_type(name: str, widget: bool = False, keys: tuple = ()):
    """A type namespace with Input / Output classes, like io.Int, io.Image, io.Custom(...)."""
    class Input(_Input):
        io_type = name

        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None,
                     default=None, **options):
            unknown = set(options) - set(keys)
            if unknown:
                raise TypeError(f"{name}.Input got unexpected argument(s) {sorted(unknown)}")
            extra = {"default": default, **options}
            if "display_mode" in extra:   # the real io serialises display_mode as "display"
                extra["display"] = extra.pop("display_mode")
            super().__init__(id, display_name, optional, tooltip, lazy, **extra)
            self.default = default

    Input.widget = widget

    class Output(_Output):
        io_type = name

    return type(name.title(), (), {"io_type": name, "Input": Input, "Output": Output})


Int = _comfy_type("INT", True, ("min", "max", "step", "control_after_generate", "display_mode"))
Float = _comfy_type("FLOAT", True, ("min", "max", "step", "round", "display_mode"))
String = _comfy_type("STRING", True, ("multiline", "placeholder", "dynamic_prompts"))
Boolean = _comfy_type("BOOLEAN", True, ("label_on", "label_off"))
Image = _comfy_type("IMAGE")


class Combo:
    io_type = "COMBO"

    class Input(_Input):
        io_type = "COMBO"
        widget = True

        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None,
                     lazy=None, default=None, control_after_generate=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default=default,
                             multiselect=False, options=list(options or []),
                             control_after_generate=control_after_generate)
            self.options, self.default = list(options or []), default

    Output = _Output


def Custom(io_type: str):
    return _comfy_type(io_type)


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


class HiddenHolder(SimpleNamespace):
    def __getattr__(self, key):      # like the real holder: unknown hidden values are None
        return None


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False
    is_experimental: bool = False
    is_deprecated: bool = False
    not_idempotent: bool = False

    def validate(self):
        ids = [i.id for i in self.inputs] + [o.id for o in self.outputs if o.id]
        if len(ids) != len(set(ids)):
            raise ValueError(f"{self.node_id}: input/output ids must be unique: {ids}")


class NodeOutput:
    def __init__(self, *args: Any, ui=None, expand=None, block_execution=None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if self.args else None

    def __getitem__(self, index):
        return self.args[index]


class _classproperty:
    def __init__(self, getter):
        self.getter = getter

    def __get__(self, instance, owner):
        return self.getter(owner)


class ComfyNode:
    hidden = HiddenHolder()

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError(f"{cls.__name__} defines no schema")

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError(f"{cls.__name__} defines no execute")

    @classmethod
    def validate_inputs(cls, **kwargs):
        return True

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.validate()
        return schema

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        """The V1 view ComfyUI serves in /object_info (`input`)."""
        schema = cls.GET_SCHEMA()
        info: dict = {"required": {}}
        for item in schema.inputs:
            info.setdefault("optional" if item.optional else "required", {})[item.id] = \
                (item.io_type, item.as_dict())
        for hidden in schema.hidden or []:
            info.setdefault("hidden", {})[hidden.name] = (hidden.value,)
        return info

    @_classproperty
    def RETURN_TYPES(cls) -> list[str]:
        return [o.io_type for o in cls.GET_SCHEMA().outputs]


class ComfyExtension:
    async def on_load(self) -> None:
        return None

    async def get_node_list(self) -> list:
        raise NotImplementedError


class _UI:
    class PreviewImage:
        """Keeps the image batch instead of writing temp files."""

        def __init__(self, image, animated: bool = False, cls=None, **kwargs):
            self.image = image

        def as_dict(self) -> dict:
            return {"images": [{"tensor": self.image}]}

    class PreviewText:
        def __init__(self, value: str, **kwargs):
            self.value = value

        def as_dict(self) -> dict:
            return {"text": (self.value,)}


io = SimpleNamespace(Int=Int, Float=Float, String=String, Boolean=Boolean, Combo=Combo, Image=Image,
                     Custom=Custom, Hidden=Hidden, HiddenHolder=HiddenHolder, Schema=Schema,
                     NodeOutput=NodeOutput, ComfyNode=ComfyNode)
ui = _UI
