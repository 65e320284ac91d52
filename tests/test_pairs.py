import json
import random

import pytest
from hypothesis import given, settings, strategies as st

from vare_core.erasure.pairs import (DEFAULT_TEMPLATES, PromptPair, draw_slot_values, fill_template,
                                     make_pairs, render_template)
from vare_core.erasure.pairs_file import (check_concept_present, infer_concept_anchor, load_pairs_file,
                                          pairs_to_text, parse_pairs_text)

WORLD_TEMPLATES = [
    "a {color} {} on a {background} background",
    "a {style} {color} {}",
    "a photo of a {} in {color} on {background}",
    "a {color} {} next to another {color} {}",
]
WORLD_SLOTS = {"color": ["red", "green", "blue", "yellow", "purple"],
               "background": ["white", "black", "gray"], "style": ["solid", "striped"]}


# ----------------------------------------------------------------------------- templates

def test_default_templates_are_distinct_generic_and_single_slot():
    assert len(set(DEFAULT_TEMPLATES)) == len(DEFAULT_TEMPLATES) >= 45
    for template in DEFAULT_TEMPLATES:
        assert template.count("{}") == 1 and template.format("X").count("X") == 1


def test_generated_pairs_share_the_template():
    pairs = make_pairs("church", "house", n_per_concept=50, seed=3)
    assert len(pairs) == 50
    assert len({p.unsafe for p in pairs}) == 50  # 50 templates, each once
    for p in pairs:
        assert (p.concept, p.anchor) == ("church", "house")
        assert p.unsafe.replace("church", "house") == p.safe
        assert "church" in p.unsafe and "church" not in p.safe


def test_make_pairs_is_deterministic_from_seed():
    a = make_pairs(["church", "dog"], ["house", "cat"], n_per_concept=20, seed=7)
    b = make_pairs(["church", "dog"], ["house", "cat"], n_per_concept=20, seed=7)
    c = make_pairs(["church", "dog"], ["house", "cat"], n_per_concept=20, seed=8)
    assert a == b and a != c


def test_several_concepts_and_anchor_forms():
    pairs = make_pairs(["church", "van gogh painting"], "building", n_per_concept=4)
    assert [p.concept for p in pairs] == ["church"] * 4 + ["van gogh painting"] * 4
    assert {p.anchor for p in pairs} == {"building"}
    pairs = make_pairs(["church", "dog"], ["house", "cat"], n_per_concept=3)
    assert [(p.concept, p.anchor) for p in pairs] == [("church", "house")] * 3 + [("dog", "cat")] * 3
    # a UI string: comma-separated, whitespace normalised, trailing separators ignored
    pairs = make_pairs("church,  van   gogh ,\n", "house", n_per_concept=1)
    assert [p.concept for p in pairs] == ["church", "van gogh"]


def test_more_pairs_than_templates_cycles_through_all():
    templates = ["a photo of a {}", "a drawing of a {}", "a {} at night"]
    pairs = make_pairs("cat", "dog", n_per_concept=7, templates=templates, seed=1)
    used = [next(t for t in templates if t.format("cat") == p.unsafe) for p in pairs]
    assert sorted(used[:3]) == sorted(templates) and sorted(used[3:6]) == sorted(templates)


def test_world_templates_fill_same_attributes_in_both_prompts():
    pairs = make_pairs("circle", "square", n_per_concept=40, seed=0, templates=WORLD_TEMPLATES,
                       slot_values=WORLD_SLOTS)
    assert len({p.unsafe for p in pairs}) > 10  # attribute values vary between pairs
    for p in pairs:
        assert p.unsafe.replace("circle", "square") == p.safe
        assert "{" not in p.unsafe and "}" not in p.unsafe
    twice = [p for p in pairs if "next to another" in p.unsafe]
    assert twice
    for p in twice:  # a slot used twice gets the same value; {} twice gets the subject twice
        words = p.unsafe.split()
        assert words[1] == words[-2] and words[2] == words[-1] == "circle"


def test_fill_template_and_helpers():
    rng = random.Random(0)
    prompt = fill_template("a {color} {} on {background}", "circle", rng, WORLD_SLOTS)
    words = prompt.split()
    assert words[1] in WORLD_SLOTS["color"] and words[2] == "circle"
    assert words[-1] in WORLD_SLOTS["background"]
    values = draw_slot_values("a {color} {} and a {color} dot", random.Random(1), WORLD_SLOTS)
    assert list(values) == ["color"]
    assert render_template("{{literal}} {} {x}", "cat", {"x": "y"}) == "{literal} cat y"
    assert fill_template("a photo of a {}", "dog", rng) == "a photo of a dog"


@pytest.mark.parametrize("template, match", [
    ("a photo of a cat", "no {} slot"),
    ("a {0} photo", "not allowed"),
    ("a {} {color!r}", "not allowed"),
    ("a {} {color:>5}", "not allowed"),
    ("a {} {", "malformed"),
    ("a {} {shape}", "shape"),
])
def test_bad_templates(template, match):
    with pytest.raises(ValueError, match=match):
        make_pairs("cat", "dog", n_per_concept=2, templates=[template], slot_values=WORLD_SLOTS)


def test_vocabulary_check_names_word_and_close_matches():
    vocab = {"a", "red", "circle", "square", "on", "white", "background", "disc"}
    make_pairs("circle", "square", n_per_concept=2, templates=["a {}"], vocabulary=vocab)
    with pytest.raises(ValueError, match=r"'circel'.*close known words: \['circle'") as info:
        make_pairs("circel", "square", n_per_concept=2, templates=["a {}"], vocabulary=vocab)
    assert "concept" in str(info.value)
    with pytest.raises(ValueError, match="anchor 'red sqare'.*'sqare'.*'square'"):
        make_pairs("circle", "red sqare", templates=["a {}"], vocabulary=vocab)
    with pytest.raises(ValueError, match="known words include"):
        make_pairs("zzzzzz", "square", templates=["a {}"], vocabulary=vocab)


@pytest.mark.parametrize("kwargs, match", [
    ({"concepts": "", "anchors": "dog"}, "concepts"),
    ({"concepts": ["cat", "  "], "anchors": "dog"}, r"concepts\[1\] is empty"),
    ({"concepts": [], "anchors": "dog"}, "concepts is empty"),
    ({"concepts": "cat", "anchors": ""}, "anchors"),
    ({"concepts": "Cat", "anchors": "cat"}, "equals its anchor"),
    ({"concepts": ["cat", "dog"], "anchors": ["a", "b", "c"]}, "3 anchors for 2 concepts"),
    ({"concepts": ["cat", "dog", "cow"], "anchors": ["a", "b"]}, "2 anchors for 3 concepts"),
    ({"concepts": ["cat", "cat"], "anchors": "dog"}, "twice"),
    ({"concepts": "cat", "anchors": "dog", "n_per_concept": 0}, "n_per_concept"),
    ({"concepts": "cat", "anchors": "dog", "n_per_concept": -3}, "n_per_concept"),
    ({"concepts": "cat", "anchors": "dog", "n_per_concept": 2.5}, "n_per_concept"),
    ({"concepts": "cat", "anchors": "dog", "templates": []}, "templates is empty"),
    ({"concepts": 3, "anchors": "dog"}, "concepts must be"),
])
def test_make_pairs_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_pairs(**kwargs)


# ----------------------------------------------------------------------------- text format

def test_parse_pairs_text_formats_comments_and_blank_lines():
    text = """# my pairs
a photo of a church | a photo of a house

a church at night\ta house at night
  a church in snow  =>  a house in snow   # trailing comment
"""
    pairs = parse_pairs_text(text)
    assert [(p.unsafe, p.safe) for p in pairs] == [
        ("a photo of a church", "a photo of a house"),
        ("a church at night", "a house at night"),
        ("a church in snow", "a house in snow")]
    assert all((p.concept, p.anchor) == ("church", "house") for p in pairs)
    pairs = parse_pairs_text("a photo of a church | a photo of a house", default_concept="churches")
    assert pairs[0].concept == "churches"


@pytest.mark.parametrize("text, match", [
    ("ok a | ok b\nno separator here", "line 2: no separator"),
    ("a | b | c", "line 1: 2 separators"),
    ("a => b | c", "line 1: 2 separators"),
    ("# c\n\n | safe", "line 3: the unsafe prompt is empty"),
    ("unsafe |   ", "line 1: the safe prompt is empty"),
])
def test_parse_errors_name_the_line(text, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_pairs_text(text)
    if "separator" in match:
        assert "unsafe prompt | safe prompt" in str(info.value)


def test_infer_concept_anchor():
    assert infer_concept_anchor("a photo of a man hitting another man",
                                "a photo of a man talking with another man") == ("hitting", "talking with")
    assert infer_concept_anchor("a nude woman", "a woman") == ("nude", "")
    assert infer_concept_anchor("same", "same") == ("", "")


def test_pairs_to_text_round_trip_and_unwritable_prompts():
    pairs = make_pairs(["church", "dog"], "cat", n_per_concept=5)
    back = parse_pairs_text(pairs_to_text(pairs))
    assert [(p.unsafe, p.safe, p.concept, p.anchor) for p in back] == \
        [(p.unsafe, p.safe, p.concept, p.anchor) for p in pairs]
    for bad in ("a | b", "a # b", "a\tb", "a\nb", " a", "x => y"):
        with pytest.raises(ValueError, match="pair 0"):
            pairs_to_text([PromptPair(bad, "safe", "", "")])


_FORBIDDEN = set("|#\t") | {c for c in map(chr, range(0x2030)) if len(("a" + c + "a").splitlines()) > 1}
prompt_text = st.text(st.characters(blacklist_characters="".join(_FORBIDDEN),
                                    blacklist_categories=("Cs",)), min_size=1, max_size=30) \
    .map(lambda s: s.replace("=>", "= >").strip()).filter(bool)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(prompt_text, prompt_text), max_size=8))
def test_property_text_round_trip(raw_pairs):
    raw_pairs = [(u, s) for u, s in raw_pairs
                 if " ".join(u.casefold().split()) != " ".join(s.casefold().split())]
    pairs = parse_pairs_text(pairs_to_text([PromptPair(u, s, "", "") for u, s in raw_pairs]))
    assert [(p.unsafe, p.safe) for p in pairs] == raw_pairs
    # parsed pairs survive a second trip unchanged, concept/anchor included
    assert parse_pairs_text(pairs_to_text(pairs)) == pairs


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab |=>#\t\n\r\x0b\x85 \u2028é")) | st.characters(),
               max_size=80),
       st.one_of(st.none(), st.text(max_size=5)))
def test_property_parse_never_raises_anything_but_value_error(text, default_concept):
    try:
        pairs = parse_pairs_text(text, default_concept)
    except ValueError:
        return
    for p in pairs:
        assert p.unsafe and p.safe and p.unsafe == p.unsafe.strip()


def test_parse_rejects_non_string():
    with pytest.raises(ValueError, match="string"):
        parse_pairs_text(b"a | b")


# ----------------------------------------------------------------------------- files

def test_load_txt_json_csv(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("\ufeffa photo of a church | a photo of a house\n", encoding="utf-8")
    assert load_pairs_file(txt)[0].safe == "a photo of a house"
    js = tmp_path / "p.json"
    js.write_text(json.dumps([
        {"unsafe": "a church", "safe": "a house", "concept": "church"},
        ["a big church", "a big house"],
        {"idx": 0, "original_prompt": "a man hitting a man", "modified_prompt": "a man hugging a man"},
    ]))
    pairs = load_pairs_file(js)
    assert [(p.unsafe, p.concept, p.anchor) for p in pairs] == [
        ("a church", "church", "house"), ("a big church", "church", "house"),
        ("a man hitting a man", "hitting", "hugging")]
    cs = tmp_path / "p.csv"
    cs.write_text('Unsafe,safe\n"a church, at night",a house at night\na church | x,a house | x\n')
    pairs = load_pairs_file(cs)
    assert pairs[0].unsafe == "a church, at night" and pairs[1].safe == "a house | x"


@pytest.mark.parametrize("name, content, match", [
    ("p.json", "{\"unsafe\": \"a\"}", "JSON list"),
    ("p.json", "[{\"unsafe\": \"a\"", "invalid JSON at line 1"),
    ("p.json", "[{\"unsafe\": \"a\", \"other\": \"b\"}]", "entry 0: missing the key/column 'safe'"),
    ("p.json", "[[\"a\", \"b\", \"c\"]]", "entry 0: expected"),
    ("p.json", "[[\"a\", 3]]", "entry 0: unsafe and safe prompts must be strings"),
    ("p.csv", "prompt,other\na,b\n", "row 2: missing the key/column 'unsafe'"),
    ("p.txt", "# only comments\n", "holds no pairs"),
    ("p.txt", "a | b\nbroken\n", "line 2"),
    ("p.yaml", "a: b", "unsupported extension"),
])
def test_load_errors_name_file_and_entry(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_pairs_file(path)
    assert str(path) in str(info.value)


def test_load_missing_and_binary_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_pairs_file(tmp_path / "nope.txt")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00a | b")
    with pytest.raises(ValueError, match="UTF-8"):
        load_pairs_file(binary)


def test_check_concept_present():
    pairs = parse_pairs_text("a photo of two Churches | a photo of two houses\n"
                             "a Van  Gogh style field | a plain field")
    assert check_concept_present(pairs, "church")
    assert check_concept_present(pairs, "van gogh")
    assert not check_concept_present(pairs, "dog")
    assert not check_concept_present(pairs, "chur")  # whole words only
    assert not check_concept_present(pairs, "house")  # only unsafe prompts count
    assert not check_concept_present(pairs, "  ")


def test_same_prompt_twice_is_a_keep_pair():
    pairs = parse_pairs_text("a cat | a dog\na red square | A  red square")
    assert pairs[1] == PromptPair("a red square", "a red square", "", "")
    assert parse_pairs_text(pairs_to_text(pairs)) == pairs


def test_retain_pairs_keep_each_concept_and_are_seeded():
    from vare_core.erasure.pairs import retain_pairs
    pairs = retain_pairs(["square", "triangle"], n_per_concept=5, seed=3,
                         templates=["a {color} {}", "a {}"], slot_values={"color": ["red", "blue"]})
    assert len(pairs) == 10 and all(p.unsafe == p.safe and p.concept == p.anchor == "" for p in pairs)
    assert sum("square" in p.unsafe for p in pairs) == 5
    assert pairs == retain_pairs(["square", "triangle"], n_per_concept=5, seed=3,
                                 templates=["a {color} {}", "a {}"], slot_values={"color": ["red", "blue"]})
    with pytest.raises(ValueError, match="n_per_concept"):
        retain_pairs("square", n_per_concept=0)


def test_the_shapes_world_keeps_every_shape_not_erased():
    from vare_core.erasure.profile import erasure_profile
    pairs = erasure_profile("embedded").pairs("circle", "square", retain=4)
    keep = [p for p in pairs if p.unsafe == p.safe]
    assert len(pairs) == 50 + 12 and len(keep) == 12
    assert not any("circle" in p.unsafe for p in keep)
    assert {w for p in keep for w in ("square", "triangle", "cross") if w in p.unsafe} == {"square", "triangle", "cross"}
    assert len(erasure_profile("embedded").pairs("circle", "square", retain=0)) == 50
