"""The example workflows in workflows/: UI format, checked against the registered nodes.

Each file may only use node types that exist (ours, a few built-ins, frontend-only notes), give
every widget a valid value in the frontend's order (an INT/COMBO with control_after_generate is
followed by its "fixed"/"randomize" entry), and link outputs to inputs of the same type. Its
nodes' stored boxes (pos, size and the title bar above pos) keep apart and are at least as tall as
their rows, so the canvas shows every node whole.

`object_info_of_pack()` describes our nodes the way ComfyUI's /object_info does (through the
V3 stand-in when ComfyUI is absent); tests/test_comfy_e2e.py runs the same checks against a
real server's /object_info and uses `to_api()` to queue workflows 1 and 2.
"""
import json
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
FRONTEND_ONLY = {"MarkdownNote", "Note"}           # drawn by the frontend, never sent to /prompt
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Inputs whose choices are the user's model files: a workflow names the documented file.
FILE_INPUTS = {("VARE_LoadModel", "transformer"), ("VARE_LoadModel", "vae"),
               ("VARE_LoadModel", "text_encoder"), ("VARE_LoadAdapter", "adapter_name")}
# The built-in nodes our workflows use, as /object_info of ComfyUI 0.3.64 describes them.
BUILTINS = {
    "PreviewImage": {"input": {"required": {"images": ["IMAGE"]}}, "output": []},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}],
                                         "filename_prefix": ["STRING", {"default": "ComfyUI"}]}}, "output": []},
}
EXPECTED = {"vare_embedded_text_to_image", "vare_embedded_erase_before_after", "vare_infinity_2b_text_to_image",
            "vare_infinity_2b_train_svare", "vare_load_and_apply_adapter", "vare_infinity_2b_erase_nudity",
            "vare_embedded_concept_guard", "vare_infinity_2b_concept_guard"}


def object_info_of_pack() -> dict:
    import nodes
    info = {name: dict(spec) for name, spec in BUILTINS.items()}
    for node in nodes.NODES:
        schema = node.GET_SCHEMA()
        info[schema.node_id] = {"input": node.INPUT_TYPES(), "output": list(node.RETURN_TYPES)}
    return info


def input_specs(spec: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) in the frontend's order: required, then optional."""
    out = []
    for group in ("required", "optional"):
        for name, entry in spec["input"].get(group, {}).items():
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            out.append((name, "COMBO" if isinstance(kind, list) else kind, options))
    return out


def widget_slots(spec: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, has_control_entry) of every widget, in widgets_values order."""
    return [(name, kind, options, bool(options.get("control_after_generate")))
            for name, kind, options in input_specs(spec) if kind in WIDGET_TYPES]


def check_value(node_type, name, kind, options, value) -> str | None:
    where = f"{node_type}.{name} = {value!r}"
    if kind == "COMBO":
        choices = options.get("options", [])
        if (node_type, name) in FILE_INPUTS:
            return None if isinstance(value, str) and value.strip() else f"{where}: a file name is needed"
        return None if value in choices else f"{where} is not one of {choices[:8]}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{where} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{where} is not text"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
        return f"{where} is not an {kind}"
    if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
        return f"{where} is outside [{options.get('min')}, {options.get('max')}]"
    return None


def check_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Every problem a ComfyUI would trip over when loading / queueing this UI-format file."""
    problems = []
    nodes_by_id = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY:
            continue
        if kind not in object_info:
            problems.append(f"node {node['id']}: type {kind} is not registered")
            continue
        spec = object_info[kind]
        values = list(node.get("widgets_values") or [])
        linked = {s["name"] for s in node.get("inputs", []) if s.get("link") is not None}
        expected = 0
        for name, wkind, options, control in widget_slots(spec):
            if not values:
                problems.append(f"node {node['id']} {kind}: no value for widget {name}")
                break
            value = values.pop(0)
            expected += 1
            if name not in linked:
                problem = check_value(kind, name, wkind, options, value)
                if problem:
                    problems.append(f"node {node['id']}: {problem}")
            if control:
                entry = values.pop(0) if values else None
                if entry not in CONTROL_VALUES:
                    problems.append(f"node {node['id']} {kind}.{name}: control entry {entry!r} missing")
        if values:
            problems.append(f"node {node['id']} {kind}: {len(values)} widget value(s) too many: {values}")
        for name, ikind, options in input_specs(spec):
            if ikind in WIDGET_TYPES:
                continue
            slot = next((s for s in node.get("inputs", []) if s["name"] == name), None)
            required = name in spec["input"].get("required", {})
            if slot is None or slot.get("link") is None:
                if required:
                    problems.append(f"node {node['id']} {kind}: required input {name} is not connected")
                continue
            link = links.get(slot["link"])
            if link is None:
                problems.append(f"node {node['id']} {kind}.{name}: link {slot['link']} does not exist")
                continue
            _, origin, origin_slot, target, _, link_type = link
            source = nodes_by_id.get(origin)
            if source is None or target != node["id"]:
                problems.append(f"link {link[0]}: bad endpoints")
                continue
            out_types = object_info.get(source["type"], {}).get("output", [])
            given = out_types[origin_slot] if origin_slot < len(out_types) else None
            if given != ikind or link_type != ikind:
                problems.append(f"node {node['id']} {kind}.{name} wants {ikind} but gets {given} ({link_type})")
    return problems


def to_api(workflow: dict, object_info: dict) -> dict:
    """UI format -> the API format /prompt takes (what the frontend's graphToPrompt makes)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):   # muted / bypassed
            continue
        spec = object_info[node["type"]]
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, _, _, control in widget_slots(spec):
            inputs[name] = values.pop(0)
            if control:
                values.pop(0)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, origin, origin_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


TITLE_HEIGHT = 30       # LiteGraph.NODE_TITLE_HEIGHT: the title bar is drawn above `pos`
MIN_GAP = 20            # between two nodes' boxes (the source badge sits just above a title bar)
SLOT_ROW, WIDGET_ROW = 20, 24    # the least height the frontend gives an input/output row and a widget row


def node_box(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node on the canvas, its title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def least_height(node: dict, object_info: dict) -> int:
    """A lower bound on the body height the frontend draws: its slot rows plus its widget rows."""
    spec = object_info.get(node["type"])
    if spec is None:
        return 0
    slots = [name for name, kind, _ in input_specs(spec) if kind not in WIDGET_TYPES]
    widgets = sum(2 if control else 1 for *_, control in widget_slots(spec))
    return SLOT_ROW * max(len(slots), len(spec["output"])) + WIDGET_ROW * widgets


def layout_problems(workflow: dict, object_info: dict) -> list[str]:
    """Nodes whose stored boxes overlap or nearly touch, and nodes stored shorter than their rows:
    the frontend draws a node at least as tall as its widgets, over whatever lies below it."""
    problems = []
    nodes = workflow["nodes"]
    for node in nodes:
        need = least_height(node, object_info)
        if node["size"][1] < need:
            problems.append(f"node {node['id']} {node['type']}: stored height {node['size'][1]} < {need}")
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (al, at, ar, ab), (bl, bt, br, bb) = node_box(a), node_box(b)
            if al < br + MIN_GAP and bl < ar + MIN_GAP and at < bb + MIN_GAP and bt < ab + MIN_GAP:
                problems.append(f"nodes {a['id']} {a['type']} and {b['id']} {b['type']} overlap "
                                f"or lie closer than {MIN_GAP} px: {node_box(a)} {node_box(b)}")
    return problems


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_workflows_ship_with_thumbnails():
    assert {p.stem for p in WORKFLOWS} == EXPECTED
    for path in WORKFLOWS:
        thumbnail = path.with_suffix(".jpg")
        assert thumbnail.is_file(), f"{thumbnail.name} missing (the template browser shows it)"
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and min(image.size) >= 128


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_uses_only_registered_nodes_and_valid_widget_values(path):
    workflow = load(path)
    assert workflow.get("version") == 0.4 and workflow["nodes"] and "links" in workflow
    assert check_workflow(workflow, object_info_of_pack()) == []
    notes = [n for n in workflow["nodes"] if n["type"] == "MarkdownNote"]
    assert notes and notes[0]["widgets_values"][0].startswith("## VARE")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_nodes_do_not_overlap(path):
    """Stored boxes (pos, size, title bar) keep apart, so the canvas shows every node whole."""
    assert layout_problems(load(path), object_info_of_pack()) == []


def test_layout_check_catches_overlaps_and_short_nodes():
    workflow = load(REPO / "workflows" / "vare_embedded_erase_before_after.json")
    info = object_info_of_pack()
    train = next(n for n in workflow["nodes"] if n["type"] == "VARE_TrainErasure")
    plot = next(n for n in workflow["nodes"] if n["type"] == "VARE_LossPlot")
    before = layout_problems(workflow, info)
    plot["pos"] = [train["pos"][0], train["pos"][1] + train["size"][1] + 10]     # title bar over the chart
    added = [p for p in layout_problems(workflow, info) if p not in before]
    assert len(added) == 1 and "VARE_TrainErasure and" in added[0] and "VARE_LossPlot" in added[0]
    loader = next(n for n in workflow["nodes"] if n["type"] == "VARE_LoadModel")
    loader["size"] = [loader["size"][0], 150]                    # six widget rows need more than 150 px
    assert any("VARE_LoadModel: stored height 150" in p for p in layout_problems(workflow, info))


def test_checker_catches_a_shifted_widget_list():
    """The mistake a hand-written file makes: the seed's control entry left out."""
    workflow = load(REPO / "workflows" / "vare_embedded_text_to_image.json")
    sampler = next(n for n in workflow["nodes"] if n["type"] == "VARE_Sampler")
    sampler["widgets_values"].remove("fixed")
    problems = check_workflow(workflow, object_info_of_pack())
    assert any("control entry" in p for p in problems)


def test_api_conversion_of_the_text_to_image_workflow():
    prompt = to_api(load(REPO / "workflows" / "vare_embedded_text_to_image.json"), object_info_of_pack())
    types = sorted(n["class_type"] for n in prompt.values())
    assert types == ["PreviewImage", "VARE_LoadModel", "VARE_Sampler", "VARE_TextEncode"]
    sampler = next(n for n in prompt.values() if n["class_type"] == "VARE_Sampler")["inputs"]
    assert sampler["seed"] == 0 and sampler["cfg"] == "auto" and sampler["preview"] is True
    assert isinstance(sampler["model"], list) and prompt[sampler["model"][0]]["class_type"] == "VARE_LoadModel"


def test_thumbnail_prompts_are_the_workflows_own():
    """`demo --thumbnails` draws the template pictures from the prompts the workflows carry."""
    from vare_core.demo import APPLY_ADAPTER_PROMPTS, GUARD_PROMPTS, TEXT_TO_IMAGE_PROMPTS
    for name, prompts in (("vare_embedded_text_to_image", TEXT_TO_IMAGE_PROMPTS),
                          ("vare_load_and_apply_adapter", APPLY_ADAPTER_PROMPTS),
                          ("vare_embedded_concept_guard", GUARD_PROMPTS)):
        workflow = load(REPO / "workflows" / f"{name}.json")
        encode = next(n for n in workflow["nodes"] if n["type"] == "VARE_TextEncode")
        assert encode["widgets_values"][0].splitlines() == prompts, name
