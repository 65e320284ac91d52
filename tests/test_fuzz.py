"""Property-based tests (hypothesis) of every parser that reads user text or untrusted files.

Each parser either returns a well-formed value or raises its documented error (ValueError, or
AdapterError / CheckpointError, both ValueError subclasses) with a message that names the input;
never a bare TypeError, RecursionError or OverflowError. Valid inputs round-trip.

    python -m pytest tests/test_fuzz.py -q        # ~20 s
"""
import csv
import io
import json
import math
import string
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from nodes import adapters as adapter_nodes
from nodes import sampling as sampling_nodes
from vare_core.generation import per_scale
from vare_core.checkpoints import load_state_dict
from vare_core.embedded.profile import shape_name
from vare_core.embedded.world import SHAPES
from vare_core.erasure import adapters
from vare_core.erasure.adapters import (FORMAT_VERSION, Adapter, AdapterError, load_adapter,
                                        parse_adapter_spec, save_adapter)
from vare_core.erasure.pairs import PromptPair, make_pairs
from vare_core.erasure.pairs_file import load_pairs_file, pairs_to_text, parse_pairs_text
from vare_core.models.bsq_vae import BSQVAE, VAEConfig, normalize_vae_keys
from vare_core.models.infinity import Infinity, InfinityConfig
from vare_core.models.presets import build_infinity, from_official_keys, to_official_keys

REPO = Path(__file__).resolve().parents[1]

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FILES = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # slow bodies

# Anything a caller might pass where text or numbers are expected.
junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                 st.binary(max_size=10), st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=3),
                                                            st.booleans()), max_size=5),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
number_text = st.text(alphabet="0123456789.,-+eE [];\t\nainfxA", max_size=30)


@pytest.fixture(scope="module")
def scratch():
    """One folder for the whole module (hypothesis reruns a test body many times)."""
    with tempfile.TemporaryDirectory(prefix="vare_fuzz_") as folder:
        yield Path(folder)


# ----------------------------------------------------------------------------- cfg / tau lists

@FUZZ
@given(st.one_of(number_text, st.text(max_size=30), junk), st.integers(1, 13))
@example(10**400, 3)                 # beyond the float range
@example("3,3", 5)
@example("[[3]]", 2)
def test_per_scale_gives_n_finite_values_or_a_named_value_error(value, n_scales):
    try:
        values = per_scale.parse_per_scale(value, n_scales, "--cfg")
    except ValueError as err:
        assert str(err).startswith("--cfg: ") and "expected" in str(err)
        return
    assert len(values) == n_scales and all(isinstance(v, float) and math.isfinite(v) for v in values)


@FUZZ
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=13),
       st.sampled_from([",", ", ", " ", "\t", " ,  "]), st.booleans())
def test_per_scale_text_round_trips(values, separator, brackets):
    text = separator.join(repr(v) for v in values)
    text = f"[{text}]" if brackets else text
    assert per_scale.parse_per_scale(text, len(values), "cfg") == values
    assert per_scale.parse_per_scale(values, len(values), "cfg") == values
    assert per_scale.parse_per_scale(repr(values[0]), 7, "cfg") == [values[0]] * 7


@FUZZ
@given(st.one_of(number_text, st.text(max_size=30), st.sampled_from(["auto", " AUTO ", "Auto\n"])))
def test_sampler_node_check_agrees_with_the_parser(text):
    """What the node accepts at validation time parses at execution (one value per part)."""
    problem = sampling_nodes.check_per_scale(text, "cfg")
    if text.strip().lower() == "auto":
        assert problem is None and sampling_nodes.per_scale(text, 5, "cfg") is None
        return
    try:
        values = per_scale.per_scale_values(text, "cfg")
    except ValueError:
        assert isinstance(problem, str) and problem.startswith("cfg") and "auto" in problem
        return
    def within(kind):   # the node also refuses values the sampler's arithmetic cannot take
        low, high = per_scale.SETTING_RANGES[kind]
        return all(low <= v <= high for v in values)
    assert (problem is None) == within("cfg")
    if problem is None:   # one number stays one number (the model lays it out: free scales)
        parsed = sampling_nodes.per_scale(text, len(values), "cfg")
        assert (parsed == values[0]) if len(values) == 1 else (parsed == values)
    tau_problem = sampling_nodes.check_per_scale(text, "tau", positive=True)
    assert (tau_problem is None) == (all(v > 0 for v in values) and within("tau"))


# ----------------------------------------------------------------------------- prompt pairs

prompt = st.text(alphabet=string.ascii_letters + string.digits + " ,.'|#=>\t\né-", min_size=1, max_size=30)
clean_prompt = st.text(alphabet=string.ascii_letters + " ,.'é", min_size=1, max_size=30).map(
    lambda s: " ".join(s.split())).filter(bool)


def distinct(unsafe: str, safe: str) -> bool:
    return " ".join(unsafe.casefold().split()) != " ".join(safe.casefold().split())


@FUZZ
@given(st.lists(st.tuples(clean_prompt, clean_prompt).filter(lambda p: distinct(*p)), min_size=1, max_size=6),
       st.lists(st.sampled_from(["", "   ", "# a comment", "  # another | with => separators"]), max_size=4))
def test_pairs_text_ignores_comments_and_blank_lines(raw, noise):
    text = pairs_to_text([PromptPair(u, s, "", "") for u, s in raw])
    lines = text.splitlines()
    for i, extra in enumerate(noise):                     # sprinkle noise between the pairs
        lines.insert(min(i * 2, len(lines)), extra)
    pairs = parse_pairs_text("\n".join(lines))
    assert [(p.unsafe, p.safe) for p in pairs] == raw


@FILES
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode), st.sampled_from([".txt", ".json", ".csv"]))
@example(b"[" * 50_000, ".json")                             # deeper than json can nest
@example(b'[{"unsafe": 5, "safe": "x"}]', ".json")
@example(b"unsafe,safe\na,b,c,d\n", ".csv")
@example(b"safe\nx\n", ".csv")
def test_pairs_file_of_any_bytes_loads_or_names_the_file(scratch, data, suffix):
    path = scratch / f"pairs{suffix}"
    path.write_bytes(data)
    try:
        pairs = load_pairs_file(path)
    except ValueError as err:
        assert str(path) in str(err)
        return
    assert pairs and all(p.unsafe and p.safe and distinct(p.unsafe, p.safe) for p in pairs)


@FILES
@given(st.lists(st.one_of(json_values,
                          st.fixed_dictionaries({"unsafe": json_values | prompt, "safe": json_values | prompt}),
                          st.tuples(prompt, prompt).map(list)), max_size=4))
def test_pairs_json_of_any_shape_loads_or_names_the_file(scratch, data):
    path = scratch / "shapes.json"
    path.write_text(json.dumps(data))
    try:
        pairs = load_pairs_file(path)
    except ValueError as err:
        assert str(path) in str(err)
        return
    assert len(pairs) == len(data)


@FILES
@given(st.lists(st.tuples(prompt, prompt), min_size=1, max_size=5), st.sampled_from(["json", "csv"]))
def test_pairs_json_and_csv_round_trip(scratch, raw, kind):
    """Prompts with '|', '#', tabs and line breaks survive JSON and CSV (the text format cannot hold them)."""
    raw = [(u.strip(), s.strip()) for u, s in raw]
    assume(all(u and s and distinct(u, s) for u, s in raw))
    path = scratch / f"round.{kind}"
    if kind == "json":
        path.write_text(json.dumps([{"unsafe": u, "safe": s} for u, s in raw]))
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["unsafe", "safe"])
        writer.writerows(raw)
        path.write_text(buffer.getvalue())
    assert [(p.unsafe, p.safe) for p in load_pairs_file(path)] == raw


@FUZZ
@given(st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8), max_size=3), junk),
       st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8), max_size=3), junk),
       st.integers(-2, 5))
def test_make_pairs_puts_concept_and_anchor_in_every_pair_or_refuses(concepts, anchors, n):
    try:
        pairs = make_pairs(concepts, anchors, n_per_concept=n, seed=0)
    except ValueError as err:
        assert str(err)
        return
    assert n > 0 and pairs
    for pair in pairs:
        assert pair.concept in pair.unsafe and pair.anchor in pair.safe


@FUZZ
@given(st.one_of(st.text(max_size=15), st.sampled_from(["Circle", " round  shape ", "PLUS sign", "disc"]), junk))
def test_shape_name_returns_a_shape_or_lists_the_known_ones(word):
    try:
        name = shape_name(word, "--concept")
    except ValueError as err:
        assert str(err).startswith("--concept")
        return
    assert name in SHAPES


# ----------------------------------------------------------------------------- adapter specs

@FUZZ
@given(st.one_of(st.text(max_size=30), st.text(alphabet="ab:/\\.0123456789-+eEnaif C", max_size=20), junk))
@example("C:\\erase.safetensors")
@example("x.safetensors:1e999")
@example(":")
def test_adapter_spec_parses_or_names_the_spec(spec):
    try:
        path, strength = parse_adapter_spec(spec)
    except AdapterError as err:
        assert "adapter spec" in str(err)
        return
    assert isinstance(path, str) and path and path == path.strip()
    assert -2.0 <= strength <= 2.0


adapter_path = st.text(alphabet=string.ascii_letters + string.digits + "/._- ", min_size=2, max_size=30).filter(
    lambda p: p == p.strip() and p.strip())


@FUZZ
@given(adapter_path, st.floats(-2.0, 2.0))
def test_adapter_spec_round_trips(path, strength):
    assert parse_adapter_spec(f"{path}:{strength!r}") == (path, strength)
    assert parse_adapter_spec(f"  {path}  ") == (path, 1.0)


# ----------------------------------------------------------------------------- adapter files

def lora_tensors():
    return {"blocks.0.ca.mat_q.lora_A": torch.randn(2, 8), "blocks.0.ca.mat_q.lora_B": torch.randn(8, 2)}


BASE_METADATA = {"format": json.dumps(FORMAT_VERSION), "train": json.dumps("lora")}
READ_BACK_KEYS = sorted(adapters._METADATA_TYPES)


@FILES
@given(st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=40), max_size=4),
       st.dictionaries(st.sampled_from(READ_BACK_KEYS + ["format", "train", "lora_scale"]),
                       json_values.map(json.dumps), max_size=3))
@example({"concepts": "[" * 20_000 + "]" * 20_000}, {})      # nesting deeper than json allows
@example({}, {"final_losses": '{"loss": "low"}'})
@example({}, {"concepts": '"circle"'})
def test_adapter_metadata_is_data_and_bad_values_are_adapter_errors(scratch, raw, json_fields):
    """Any metadata: load_adapter returns the adapter or an AdapterError naming the file, and a
    loaded adapter can always be described and named by the nodes."""
    path = scratch / "meta.safetensors"
    save_file(lora_tensors(), str(path), metadata={**BASE_METADATA, **raw, **json_fields})
    try:
        adapter = load_adapter(path)
    except AdapterError as err:
        assert str(path) in str(err)
        return
    assert isinstance(adapter_nodes.describe(adapter), str)
    assert isinstance(adapter_nodes.output_name("erase_{concepts}_{method}", adapter), str)


@FEW
@given(st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k not in adapters._METADATA_TYPES
                                                               and k not in ("format", "train", "lora_scale")),
                       json_values, max_size=5),
       st.lists(st.text(max_size=10), max_size=3))
def test_adapter_metadata_round_trips(scratch, extra, concepts):
    metadata = {"format": FORMAT_VERSION, "train": "lora", "concepts": concepts, **extra}
    path = scratch / "round.safetensors"
    save_adapter(Adapter(tensors=lora_tensors(), metadata=metadata), path)
    assert load_adapter(path).metadata == metadata


def test_a_header_length_that_looks_like_a_pickle_marker_still_loads(scratch):
    """The 8-byte length of a safetensors header may start 0x80 0x02 like a pickle (found by the
    round-trip property above); the adapter must load anyway."""
    for padding in range(400):
        metadata = {"format": FORMAT_VERSION, "train": "lora", "note": "x" * padding}
        path = scratch / "marker.safetensors"
        save_adapter(Adapter(tensors=lora_tensors(), metadata=metadata), path)
        head = path.read_bytes()[:2]
        if head[0] == 0x80 and 2 <= head[1] <= 5:
            assert load_adapter(path).metadata == metadata
            return
    pytest.fail("no padding gave a pickle-like header length")


@FILES
@given(st.binary(max_size=300))
@example(struct.pack("<Q", 2**63) + b"{}")
@example(struct.pack("<Q", 2) + b"[]")
@example(struct.pack("<Q", 14) + b'{"__metadata__": 1}'[:14])
def test_any_bytes_are_not_an_adapter(scratch, data):
    path = scratch / "junk.safetensors"
    path.write_bytes(data)
    with pytest.raises(AdapterError, match="junk.safetensors"):
        load_adapter(path)
    assert adapter_nodes.is_vare_adapter(path) in (True, False)


@FILES
@given(json_values)
def test_adapter_listing_reads_any_header_without_crashing(scratch, header):
    path = scratch / f"listed_{abs(hash(json.dumps(header))) % 10**9}.safetensors"
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    assert adapter_nodes.is_vare_adapter(path) is False


# ----------------------------------------------------------------------------- checkpoints

BLOCK_PARTS = ["sa.mat_qkv.weight", "sa.proj.bias", "ca.mat_q.weight", "ca.mat_kv.weight",
               "ffn.fc1.weight", "ffn.fc2.bias", "ada_gss", "sa.scale_mul_1H11"]
OTHER_KEYS = ["pos_start", "word_embed.weight", "head.weight", "lvl_embed.weight", "cfg_uncond",
              "text_norm.weight", "blocks_extra", "block_chunks", "blocks.x.y"]


@FUZZ
@given(st.integers(1, 12), st.integers(1, 6), st.lists(st.sampled_from(BLOCK_PARTS), min_size=1, unique=True),
       st.lists(st.sampled_from(OTHER_KEYS), unique=True))
def test_official_key_mapping_round_trips(depth, per_chunk, parts, others):
    ours = {f"blocks.{i}.{part}": (i, part) for i in range(depth) for part in parts}
    ours.update({key: key for key in others})
    official = to_official_keys(ours, per_chunk)
    assert len(official) == len(ours)
    assert all(not k.startswith("blocks.") or k in others for k in official)
    assert from_official_keys(official) == ours
    assert from_official_keys(ours) == ours                     # our names pass unchanged


def _vae_keys() -> list[str]:
    vae = BSQVAE(VAEConfig(bits=8, patch_size=4, base_channels=24, channel_mult=(1, 2, 2), num_res_blocks=1))
    return list(vae.state_dict())


VAE_KEYS = _vae_keys()


def official_vae_key(key: str) -> str:
    """How the official VAE names our tensor: convs and norms are wrapped one level deeper."""
    module, _, leaf = key.rpartition(".")
    name = module.rpartition(".")[2]
    if name in ("conv_in", "conv_out", "conv1", "conv2", "nin_shortcut", "conv"):
        return f"{module}.conv.{leaf}"
    if name in ("norm1", "norm2", "norm_out"):
        return f"{module}.norm.{leaf}"
    return key


@FEW
@given(st.lists(st.booleans(), min_size=len(VAE_KEYS), max_size=len(VAE_KEYS)), st.booleans(), st.booleans())
def test_vae_key_normalisation_undoes_the_official_wrappers(wrapped, with_masks, nested):
    state = {official_vae_key(k) if wrap else k: k for k, wrap in zip(VAE_KEYS, wrapped)}
    if with_masks:
        state.update({"quantizer.lfq.mask": 0, "quantize.lfq.mask": 0})
    normalised = normalize_vae_keys({"vae": state} if nested else state)
    assert normalised == {k: k for k in VAE_KEYS}
    assert normalize_vae_keys(normalised) == normalised         # idempotent


@pytest.fixture(scope="module")
def tiny_official():
    torch.manual_seed(0)
    cfg = InfinityConfig(depth=2, embed_dim=32, num_heads=2, bits=4, text_channels=16, text_maxlen=4,
                         block_chunks=2, num_levels=3)
    model = Infinity(cfg)
    return to_official_keys(model.state_dict(), cfg.blocks_per_chunk)


@FEW
@given(st.data())
def test_damaged_transformer_state_dicts_give_value_errors_naming_the_source(tiny_official, data):
    keys = sorted(tiny_official)
    drop = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
    reshape = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=3))
    state = {k: v for k, v in tiny_official.items() if k not in drop}
    for key in reshape:
        if key in state:
            state[key] = torch.zeros(state[key].numel() + 1)
    if not drop and not reshape:
        assert build_infinity(state, source="fuzz.pth") is not None
        return
    with pytest.raises(ValueError, match="fuzz.pth"):
        build_infinity(state, source="fuzz.pth")


header_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "F99", ""]),
    "shape": st.lists(st.integers(-1, 4), max_size=3),
    # Integer offsets only: text offsets and deep nesting crash checkpoints.py (xfail rows in
    # tests/test_bad_inputs.py record them).
    "data_offsets": st.lists(st.integers(-4, 64), max_size=3)})


@FILES
@given(st.dictionaries(st.text(max_size=6), header_entry, max_size=3), st.binary(max_size=64))
def test_safetensors_with_any_header_load_or_give_a_checkpoint_error(scratch, header, payload):
    path = scratch / "fuzz.safetensors"
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + payload)
    try:
        tensors = load_state_dict(path)
    except ValueError as err:
        assert str(path) in str(err)
        return
    assert all(torch.is_tensor(t) for t in tensors.values())
