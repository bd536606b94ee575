"""Recipes (optbrain.recipe): round trips, refinement order, matching, short forms, validation
errors naming the key / file / line, and plans that drive the layer API unchanged."""

import pytest
import torch
import yaml

from optbrain import compress_layer
from optbrain.core.spec import make_spec
from optbrain.recipe import DEFAULTS, CalibrationConfig, LayerPlan, Recipe, RecipeError, Rule

COMPLEX = {
    "version": 1,
    "calibration": {"mode": "sequential", "samples": 64, "batch_size": 8},
    "seed": 7,
    "bn_recalibration": True,
    "ignore": ["classifier", "re:.*embeddings.*"],
    "rules": [
        {
            "targets": ["*"],
            "method": "gptq",
            "bits": 4,
            "group_size": 128,
            "sym": False,
            "options": {"act_order": True, "block_size": 64},
        },
        {
            "targets": [r"re:encoder\.layer\.[0-2]\..*"],
            "ignore": ["*.attention.*"],
            "group_size": None,
            "damp": 1e-5,
            "dtype": "float64",
        },
        {"targets": ["*.output.dense"], "method": "sparsegpt", "pattern": "2:4", "bits": None},
        {"targets": ["pooler.dense"], "skip": True, "on_singular": "eig"},
        {"targets": "*.intermediate.dense", "method": "obc", "sparsity": 0.5, "pattern": "block4"},
    ],
}

NAMES = [
    "bert.embeddings.word",
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.intermediate.dense",
    "encoder.layer.0.output.dense",
    "encoder.layer.5.attention.self.query",
    "encoder.layer.5.output.dense",
    "pooler.dense",
    "classifier",
]


# ----------------------------------------------------------------------------- round trips


def test_dict_round_trip_complex():
    r = Recipe.from_dict(COMPLEX)
    assert len(r.rules) == 5 and r.seed == 7 and r.calibration.mode == "sequential"
    d = r.to_dict()
    assert Recipe.from_dict(d) == r
    assert Recipe.from_dict(d).to_dict() == d
    # the input mapping is not aliased
    d["rules"][0]["options"]["act_order"] = False
    assert r.rules[0].options["act_order"] is True


def test_yaml_round_trip_complex_and_human_friendly():
    r = Recipe.from_dict(COMPLEX)
    text = r.to_yaml()
    assert Recipe.from_yaml(text) == r
    # unset keys omitted; explicit nulls (reset) kept; N:M quoted so any YAML reader gets a string
    rules = yaml.safe_load(text)["rules"]
    assert "sym" not in rules[1] and "method" not in rules[1]
    assert "group_size" in rules[1] and rules[1]["group_size"] is None
    assert rules[2]["pattern"] == "2:4" and rules[2]["bits"] is None
    assert set(rules[3]) == {"targets", "skip", "on_singular"}
    assert "batch_size: 8" in text
    assert "batch_size" not in Recipe().to_yaml()


def test_plans_survive_round_trip():
    r = Recipe.from_dict(COMPLEX)
    again = Recipe.from_yaml(r.to_yaml())
    assert again.plans(NAMES) == r.plans(NAMES)
    assert set(r.plans(NAMES)) == {
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.0.output.dense",
        "encoder.layer.5.attention.self.query",
        "encoder.layer.5.output.dense",
    }


def test_save_load_and_coerce(tmp_path):
    r = Recipe.from_dict(COMPLEX)
    path = r.save(tmp_path / "recipe.yaml")
    assert Recipe.from_yaml(path) == r
    assert Recipe.from_yaml(str(path)) == r
    assert Recipe.coerce(path) == r
    assert Recipe.coerce(str(path)) == r
    assert Recipe.coerce(COMPLEX) == r
    assert Recipe.coerce(r) is r
    assert Recipe.coerce("method: obc\nsparsity: 0.5") == Recipe.from_dict(
        {"method": "obc", "sparsity": 0.5}
    )
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        Recipe.coerce(str(tmp_path / "missing.yaml"))
    with pytest.raises(TypeError):
        Recipe.coerce(3)


def test_yaml_reads_nm_patterns_and_exponent_floats():
    # plain YAML 1.1 reads 2:4 as the base-60 integer 124 and 1e-3 as a string
    r = Recipe.from_yaml("pattern: 2:4\ndamp: 1e-3\nbits: 4")
    p = r.plan("any")
    assert p.pattern == "2:4" and p.damp == pytest.approx(1e-3) and p.bits == 4


# ----------------------------------------------------------------------------- refinement


def test_later_rule_overrides_only_the_keys_it_sets():
    base = {"targets": ["*"], "method": "gptq", "bits": 4, "group_size": 128, "damp": 0.05}
    refine = {"targets": ["a.*"], "bits": 3}
    p = Recipe.from_dict({"rules": [base, refine]}).plan("a.fc")
    assert (p.method, p.bits, p.group_size, p.damp) == ("gptq", 3, 128, 0.05)
    assert p.rules == (0, 1)
    # a module the refinement does not target keeps the base settings
    assert Recipe.from_dict({"rules": [base, refine]}).plan("b.fc").bits == 4
    # order matters: the base rule, applied last, wins on the keys it sets
    q = Recipe.from_dict({"rules": [refine, base]}).plan("a.fc")
    assert (q.bits, q.group_size) == (4, 128)


def test_null_resets_to_default_and_options_follow_the_method():
    r = Recipe.from_dict(
        {
            "rules": [
                {"method": "gptq", "bits": 4, "group_size": 128, "options": {"act_order": True}},
                {"targets": ["x.*"], "group_size": None, "options": {"block_size": 32}},
                {"targets": ["x.b"], "options": {"act_order": None}},
                {"targets": ["y"], "method": "rtn", "sparsity": 0.25, "bits": None},
            ]
        }
    )
    a = r.plan("x.a")
    assert a.group_size is None and a.bits == 4
    assert a.options == {"act_order": True, "block_size": 32}  # merged key by key
    assert r.plan("x.b").options == {"block_size": 32}  # option set to null is removed
    y = r.plan("y")
    assert y.method == "rtn" and y.bits is None and y.sparsity == 0.25
    assert y.options == {}  # gptq's options do not leak into rtn


def test_no_compression_requested_gives_no_plan():
    assert Recipe().plans(["a", "b"]) == {}
    assert Recipe.from_dict({}).plan("a") is None
    assert Recipe.from_dict({"sparsity": 0.0}).plan("a") is None
    # a later rule turning quantization off leaves nothing to do
    r = Recipe.from_dict({"rules": [{"bits": 4}, {"targets": ["b"], "bits": None}]})
    assert r.plan("a").bits == 4 and r.plan("b") is None
    # N:M alone is a request (sparsity fixed by the pattern)
    assert Recipe.from_dict({"pattern": "2:4"}).plan("a").pattern == "2:4"


def test_defaults_fill_a_plan():
    p = Recipe.from_dict({"bits": 4}).plan("m")
    assert p == LayerPlan(
        method="obc",
        sparsity=None,
        pattern="unstructured",
        bits=4,
        sym=True,
        group_size=None,
        damp=DEFAULTS["damp"],
        on_singular="damp",
        dtype=torch.float32,
        options={},
    )


# ----------------------------------------------------------------------------- matching


def test_glob_crosses_dots_and_regex_is_fullmatch():
    r = Recipe.from_dict(
        {
            "rules": [
                {"targets": ["encoder.*.dense"], "bits": 4},
                {"targets": [r"re:encoder\.layer\.1\d*"], "bits": 3},  # fullmatch, not search
            ]
        }
    )
    assert r.plan("encoder.layer.0.attention.dense").bits == 4  # * crossed three dots
    assert r.plan("encoder.dense") is None  # "encoder.*.dense" needs the middle dot pair
    assert r.plan("decoder.layer.0.dense") is None  # globs are anchored
    assert r.plan("encoder.layer.12").bits == 3  # the regex matches the whole name
    assert r.plan("encoder.layer.1.fc") is None  # the regex matches only a prefix: no
    assert Recipe.from_dict({"rules": [{"targets": ["re:enc"], "bits": 3}]}).plan("encoder") is None
    assert Recipe.from_dict({"rules": [{"targets": ["re:enc.*"], "bits": 3}]}).plan("encoder")
    # case-sensitive, single-character and set globs
    r2 = Recipe.from_dict({"targets": ["fc?", "layer[02]"], "bits": 4})
    assert set(r2.plans(["fc1", "FC1", "fc10", "layer0", "layer1", "layer2"])) == {
        "fc1",
        "layer0",
        "layer2",
    }


def test_rule_ignore_only_narrows_that_rule():
    r = Recipe.from_dict(
        {
            "rules": [
                {"bits": 4},
                {"targets": ["*"], "ignore": ["*.attention.*", "re:.*\\.2\\..*"], "sparsity": 0.5},
            ]
        }
    )
    att = r.plan("layer.0.attention.q")
    assert att.bits == 4 and att.sparsity is None and att.rules == (0,)
    assert r.plan("layer.2.fc").sparsity is None
    assert r.plan("layer.1.fc").sparsity == 0.5


def test_top_level_ignore_wins_over_every_rule_and_skip_is_ordered():
    r = Recipe.from_dict(
        {
            "ignore": ["head", "re:emb.*"],
            "rules": [
                {"bits": 4},
                {"targets": ["head", "embed"], "bits": 8},
                {"targets": ["x.*"], "skip": True},
                {"targets": ["x.keep"], "skip": False},
            ],
        }
    )
    assert r.plan("head") is None and r.plan("embed") is None
    assert r.plan("x.drop") is None
    assert r.plan("x.keep").bits == 4
    assert set(r.plans(["head", "embed", "x.drop", "x.keep", "y"])) == {"x.keep", "y"}


def test_unmatched_patterns_are_reported():
    r = Recipe.from_dict(
        {"ignore": ["nothere"], "rules": [{"bits": 4}, {"targets": ["fc1", "fcx"], "bits": 3}]}
    )
    assert r.unmatched(["fc1", "fc2"]) == ["rules[1].targets 'fcx'", "ignore 'nothere'"]


# ----------------------------------------------------------------------------- short forms


@pytest.mark.parametrize(
    "d, method, sparsity, bits",
    [
        ({"method": "obc", "sparsity": 0.5}, "obc", 0.5, None),
        ({"method": "obc", "bits": 4}, "obc", None, 4),
        ({"sparsity": 0.5}, "obc", 0.5, None),
        ({"method": "gptq", "bits": 3, "group_size": 64}, "gptq", None, 3),
    ],
)
def test_short_forms_target_every_layer(d, method, sparsity, bits):
    r = Recipe.from_dict(d)
    assert len(r.rules) == 1 and r.rules[0].targets == ["*"]
    for name in ("fc", "encoder.layer.3.attention.self.query"):
        p = r.plan(name)
        assert (p.method, p.sparsity, p.bits) == (method, sparsity, bits)
    assert Recipe.from_dict(r.to_dict()) == r


def test_short_form_mixes_global_keys():
    r = Recipe.from_dict(
        {
            "sparsity": 0.5,
            "targets": ["enc.*"],
            "ignore": ["enc.head"],
            "seed": 3,
            "bn_recalibration": True,
            "calibration": {"mode": "sequential", "samples": 16},
        }
    )
    assert (
        r.seed == 3 and r.bn_recalibration and r.calibration == CalibrationConfig("sequential", 16)
    )
    assert r.ignore == ["enc.head"]
    assert set(r.plans(["enc.a", "enc.head", "dec.a"])) == {"enc.a"}


def test_python_construction_normalises():
    rule = Rule(targets="fc*", dtype=torch.float64, pattern="2 : 4")
    assert rule.targets == ["fc*"] and rule.dtype == "float64" and rule.pattern == "2:4"
    r = Recipe(rules=[{"bits": 4}, rule], calibration={"samples": 8})
    assert isinstance(r.rules[0], Rule) and r.calibration.samples == 8
    assert r.plan("fc1").dtype == torch.float64
    assert Recipe.from_yaml(r.to_yaml()) == r
    with pytest.raises(ValueError, match=r"rules\[1\].*sparsity"):
        Recipe(rules=[{"bits": 4}, {"sparsity": 2.0}])


# ----------------------------------------------------------------------------- plans drive the API


def test_plan_spec_kwargs_feed_the_layer_api():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 16, generator=g, dtype=torch.float64)
    X = torch.randn(64, 16, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / 64
    r = Recipe.from_dict(
        {"method": "obc", "sparsity": 0.5, "bits": 3, "damp": 0.02, "dtype": "float64"}
    )
    plan = r.plan("fc")
    kw = plan.spec_kwargs()
    assert "method" not in kw and plan.spec_kwargs(with_method=True)["method"] == "obc"
    spec = plan.spec(16)
    assert spec == make_spec(16, sparsity=0.5, bits=3, damp=0.02, dtype=torch.float64)
    got = compress_layer(W, H, method=plan.method, **kw)
    ref = compress_layer(W, H, sparsity=0.5, bits=3, method="obc", damp=0.02, dtype=torch.float64)
    assert torch.equal(got.weight, ref.weight) and got.loss == ref.loss


def test_options_become_keyword_arguments():
    p = Recipe.from_dict({"method": "gptq", "bits": 4, "options": {"block_size": 8}}).plan("m")
    kw = p.spec_kwargs()
    assert kw["block_size"] == 8
    kw["block_size"] = 99  # a copy: the plan is unchanged
    assert p.options == {"block_size": 8}
    assert p.spec(16).options == {"block_size": 8}
    assert p.to_dict() == {
        "method": "gptq",
        "sparsity": None,
        "pattern": "unstructured",
        "bits": 4,
        "sym": True,
        "group_size": None,
        "damp": 0.01,
        "on_singular": "damp",
        "dtype": "float32",
        "options": {"block_size": 8},
    }


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "d, match",
    [
        # unknown keys: where, key, suggestion, allowed keys
        ({"sparsty": 0.5}, r"unknown key 'sparsty' \(did you mean 'sparsity'\?\).*allowed"),
        (
            {"rules": [{"bits": 4}, {"bitz": 4}]},
            r"rules\[1\]: unknown key 'bitz' \(did you mean 'bits'\?\); allowed keys: targets",
        ),
        (
            {"rules": [], "colibration": {}},
            r"unknown key 'colibration'.*did you mean 'calibration'",
        ),
        ({"calibration": {"sample": 8}}, r"calibration: unknown key 'sample'.*'samples'"),
        ({"samples": 8, "bits": 4}, r"unknown key 'samples'.*under calibration"),
        ({"rules": [{"bits": 4}], "bits": 4}, r"'bits' belongs inside a rule"),
        # values
        ({"method": "gtpq", "bits": 4}, r"method must be one of .*'gptq'.*got 'gtpq'"),
        ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be a number in \[0, 1\)"),
        ({"sparsity": "0.5"}, r"sparsity must be a number"),
        ({"pattern": "3:2"}, r"pattern.*N must be smaller than M"),
        ({"pattern": "blocky"}, r"pattern.*'unstructured', 'N:M'"),
        ({"pattern": 124}, r"pattern must be .*quote N:M"),
        ({"pattern": "2:4", "sparsity": 0.6}, r"sparsity=0.6 contradicts pattern '2:4'"),
        ({"bits": 0}, r"bits must be an integer in \[1, 16\]"),
        ({"bits": 17}, r"bits must be an integer in \[1, 16\]"),
        ({"bits": 4.5}, r"bits must be an integer"),
        ({"bits": True}, r"bits must be an integer"),
        ({"bits": 4, "group_size": 0}, r"group_size must be a positive integer \(or null"),
        ({"bits": 4, "group_size": 2.5}, r"group_size must be a positive integer"),
        ({"bits": 4, "sym": "yes"}, r"sym must be true or false"),
        ({"bits": 4, "damp": -1}, r"damp must be a finite number >= 0"),
        ({"bits": 4, "damp": float("inf")}, r"damp must be a finite number >= 0"),
        ({"bits": 4, "dtype": "float16"}, r"dtype must be one of \['float32', 'float64'\]"),
        ({"bits": 4, "on_singular": "ignore"}, r"on_singular must be one of \['raise', 'damp'"),
        ({"bits": 4, "options": ["a"]}, r"options must be a mapping"),
        ({"bits": 4, "options": {"bits": 3}}, r"'bits' is not an option; set it as a rule key"),
        ({"bits": 4, "options": {"f": object()}}, r"options.f must be a plain value"),
        ({"bits": 4, "skip": 1}, r"skip must be true or false"),
        ({"calibration": {"mode": "joint"}}, r"calibration.mode must be one of \['independent'"),
        ({"calibration": {"samples": 0}}, r"calibration.samples must be a positive integer"),
        ({"calibration": {"samples": 1.5}}, r"calibration.samples must be a positive integer"),
        ({"calibration": {"batch_size": -2}}, r"calibration.batch_size must be a positive"),
        ({"calibration": [1]}, r"calibration must be a mapping"),
        ({"seed": 1.5}, r"seed must be an integer"),
        ({"bn_recalibration": "no"}, r"bn_recalibration must be true or false"),
        ({"version": 2}, r"version 2 is newer .* reads recipe version 1"),
        ({"version": "1"}, r"version must be a positive integer"),
        # targets / ignore
        ({"rules": [{"targets": 3, "bits": 4}]}, r"rules\[0\].targets must be a list"),
        ({"rules": [{"targets": ["a", 1], "bits": 4}]}, r"rules\[0\].targets must be a list"),
        ({"rules": [{"targets": [], "bits": 4}]}, r"rules\[0\].targets must be a non-empty"),
        ({"rules": [{"targets": [""], "bits": 4}]}, r"rules\[0\].targets\[0\] is an empty"),
        (
            {"rules": [{"targets": ["a", "re:enc(oder"], "bits": 4}]},
            r"rules\[0\].targets\[1\]: bad regular expression 'enc\(oder'",
        ),
        ({"rules": [{"ignore": ["re:[x"], "bits": 4}]}, r"rules\[0\].ignore\[0\]: bad regular"),
        ({"ignore": {"a": 1}}, r"ignore must be a list"),
        ({"ignore": ["re:*"]}, r"ignore\[0\]: bad regular expression '\*'"),
        ({"rules": {"bits": 4}}, r"rules must be a list"),
        ({"rules": [3]}, r"rules\[0\] must be a mapping"),
        ([("bits", 4)], r"a recipe must be a mapping"),
    ],
)
def test_validation_errors_name_the_key(d, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict(d)


def test_single_string_targets_and_ignore_are_wrapped():
    r = Recipe.from_dict(
        {"ignore": "head", "rules": [{"targets": "fc*", "ignore": "fc2", "bits": 4}]}
    )
    assert r.ignore == ["head"] and r.rules[0].targets == ["fc*"] and r.rules[0].ignore == ["fc2"]
    assert set(r.plans(["fc1", "fc2", "head"])) == {"fc1"}


def test_rule_object_errors():
    with pytest.raises(ValueError, match="bits must be an integer"):
        Rule(bits=99)
    with pytest.raises(ValueError, match="'bits' is both set and reset"):
        Rule(bits=4, reset=["bits"])
    with pytest.raises(ValueError, match="reset must be a list of setting names"):
        Rule(reset=["bitz"])


def test_merged_combinations_are_checked_at_plan_time():
    r = Recipe.from_dict({"rules": [{"sparsity": 0.6}, {"targets": ["nm"], "pattern": "2:4"}]})
    assert r.plan("other").sparsity == 0.6
    with pytest.raises(
        ValueError, match=r"module 'nm' \(rules \[0, 1\]\).*contradicts pattern 2:4"
    ):
        r.plan("nm")
    ok = Recipe.from_dict(
        {"rules": [{"sparsity": 0.6}, {"targets": ["nm"], "pattern": "2:4", "sparsity": None}]}
    )
    assert ok.plan("nm").pattern == "2:4" and ok.plan("nm").sparsity is None
    blk = Recipe.from_dict({"rules": [{"bits": 4}, {"targets": ["b"], "pattern": "block4"}]})
    with pytest.raises(ValueError, match=r"module 'b'.*block4 needs a sparsity"):
        blk.plan("b")


# ----------------------------------------------------------------------------- YAML errors


def test_yaml_file_bad_key_reports_key_path_and_line(tmp_path):
    path = tmp_path / "my_recipe.yaml"
    path.write_text(
        "version: 1\n"
        "rules:\n"
        "  - targets: [fc1]\n"
        "    bits: 4\n"
        "  - targets: [fc2]\n"
        "    sparsty: 0.5\n"
    )
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(path)
    msg = str(info.value)
    assert str(path) in msg and "line 6" in msg
    assert "rules[1]: unknown key 'sparsty'" in msg and "did you mean 'sparsity'" in msg
    assert info.value.path == ("rules", 1, "sparsty")


def test_yaml_file_bad_value_reports_line(tmp_path):
    path = tmp_path / "r.yml"
    path.write_text("calibration:\n  mode: sequential\n  samples: -4\nbits: 4\n")
    with pytest.raises(ValueError, match=r"r\.yml, line 3: calibration\.samples must be"):
        Recipe.from_yaml(path)


def test_yaml_syntax_error_reports_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("rules:\n  - targets: [fc1\n    bits: 4\n")
    with pytest.raises(ValueError, match=r"broken\.yaml, line \d+, column \d+: invalid YAML"):
        Recipe.from_yaml(path)


def test_yaml_duplicate_keys_and_empty_file(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("bits: 4\nsparsity: 0.5\nbits: 3\n")
    with pytest.raises(ValueError, match=r"dup\.yaml, line 3.*duplicate key 'bits'"):
        Recipe.from_yaml(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match=r"empty\.yaml: the recipe is empty"):
        Recipe.from_yaml(empty)
    with pytest.raises(ValueError, match="no such file"):
        Recipe.from_yaml("not_a_recipe_file")


# ----------------------------------------------------------- class-name targets, presets ----
def test_class_name_targets_match_classes_and_subclasses_globs_still_work():
    from torch import nn

    from optbrain.pipeline.compress import plan_layers

    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 4), MyLinear(4, 4))
    plans, _, _ = plan_layers(model, Recipe.from_dict({"targets": ["Linear"], "bits": 4}))
    assert sorted(plans) == ["2", "3"]
    plans, _, _ = plan_layers(
        model, Recipe.from_dict({"targets": ["Conv2d", "re:3"], "sparsity": 0.5})
    )
    assert sorted(plans) == ["0", "3"]
    rec = Recipe.from_dict({"bits": 4, "ignore": ["MyLinear", "0"]})
    plans, _, _ = plan_layers(model, rec)
    assert sorted(plans) == ["2"]
    with pytest.raises(ValueError, match="'Lineer' matches no layer"):
        plan_layers(model, Recipe.from_dict({"targets": ["Lineer"], "bits": 4}))


@pytest.mark.parametrize(
    ("preset", "want"),
    [
        ("w4a16", {"bits": 4, "group_size": 128}),
        ("w8a16", {"bits": 8, "group_size": 128}),
        ("2:4", {"pattern": "2:4"}),
        ("2:4+w4", {"pattern": "2:4", "bits": 4, "group_size": 128}),
        ("50%", {"sparsity": 0.5}),
        ("12.5%", {"sparsity": 0.125}),
    ],
)
def test_presets_expand_to_rule_settings(preset, want):
    rec = Recipe.from_dict({"preset": preset, "method": "auto"})
    rule = rec.rules[0].to_dict()
    assert {k: rule[k] for k in want} == want
    assert "preset" not in rule
    assert Recipe.from_dict(rec.to_dict()) == rec


def test_preset_keys_set_by_the_rule_win_and_bad_presets_are_errors():
    rec = Recipe.from_dict(
        {"rules": [{"targets": ["Linear"], "preset": "w4a16", "group_size": 32}]}
    )
    assert rec.rules[0].bits == 4 and rec.rules[0].group_size == 32
    with pytest.raises(RecipeError, match=r"rules\[0\].preset must be one of"):
        Recipe.from_dict({"rules": [{"preset": "w5a5"}]})
    with pytest.raises(RecipeError, match=r"preset must be one of.*below 100%.*'150%'"):
        Recipe.from_dict({"preset": "150%"})
    y = Recipe.from_yaml("preset: 2:4+w4\nmethod: gptq\n")
    assert y.rules[0].pattern == "2:4" and y.rules[0].bits == 4
