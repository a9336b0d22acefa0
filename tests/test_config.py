"""Run configuration: nested, typed stage configurations validated when loaded."""

import json

import pytest

from musepayne.config import ConfigError, from_mapping, to_mapping
from musepayne.extract import ExtractConfig
from musepayne.fit import FitConfig
from musepayne.pipeline.runner import RunConfig, load_config_file, read_config_file
from musepayne.prepare import PrepareConfig


def test_nested_tables_and_legacy_flat_names_give_the_same_config():
    nested = RunConfig.from_dict({"prepare": {"mode": "bulge"}, "extract": {"method": "aperture", "block": 20},
                                  "fit": {"rv_range": 300.0, "n_starts": 3}})
    flat = RunConfig.from_dict({"mode": "bulge", "extract_method": "aperture", "extract_options": {"block": 20},
                                "rv_range": 300, "fit_options": {"n_starts": 3}})
    assert nested == flat
    assert nested.prepare.mode == "bulge" and nested.extract.block == 20 and nested.fit.rv_range == 300.0


def test_round_trip_through_json():
    cfg = RunConfig.from_dict({"cube_lsf": "lamost", "prepare": {"target_lsf": "fwhm=2.7", "user_mask": [[5000, 5010]]},
                               "fit": {"precision": "float64"}})
    back = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.prepare.target_lsf.fwhm(6000.0) == 2.7


@pytest.mark.parametrize("options, words", [
    ({"min_snr": "high"}, "min_snr"),
    ({"fit_chunk": 2.5}, "fit_chunk"),
    ({"fit_chunk": True}, "fit_chunk"),
    ({"fit_chunk": 0}, "fit_chunk"),
    ({"rv_range": -5}, "rv_range"),
    ({"fit": {"n_starts": 0}}, "n_starts"),
    ({"fit": {"rv_rnage": 5}}, "rv_rnage"),
    ({"fit_options": {"rv_rnage": 5}}, "rv_rnage"),
    ({"extract": {"method": "magic"}}, "method"),
    ({"extract": {"psf": "moffat"}}, "psf"),
    ({"prepare": {"mode": 3}}, "mode"),
    ({"cube_lsf": "nonsense"}, "cube_lsf"),
    ({"colour": "blue"}, "colour"),
    ({"fit": [1, 2]}, "fit"),
    ({"blas_threads": -2}, "blas_threads"),
])
def test_bad_values_are_refused_with_the_key_named(options, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig.from_dict(options)


def test_stage_digests_follow_their_own_stage():
    base = RunConfig()
    fit_changed = base.updated(rv_range=300.0)
    prep_changed = base.updated(mode="bulge")
    assert fit_changed.stage_digest("extract") == base.stage_digest("extract")
    assert fit_changed.stage_digest("prepare") == base.stage_digest("prepare")
    assert fit_changed.stage_digest("fit") != base.stage_digest("fit")
    assert prep_changed.stage_digest("prepare") != base.stage_digest("prepare")
    assert prep_changed.stage_digest("extract") == base.stage_digest("extract")


@pytest.mark.parametrize("text, suffix", [("[run]\nfit_chunk = 2.5\n", ".toml"), ("{not json", ".json"),
                                          ("[run\n", ".toml"), ("[1, 2]", ".json"), ("\xff\xfe", ".toml")])
def test_config_files_are_validated_when_loaded(tmp_path, text, suffix):
    p = tmp_path / f"c{suffix}"
    p.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=str(p.name)):
        load_config_file(p)


def test_toml_sections(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('[run]\nmodel = "default"\nfit_chunk = 50\n[run.fit]\nrv_range = 250.0\n[run.prepare]\nmode = "bulge"\n')
    assert read_config_file(p)["fit"] == {"rv_range": 250.0}
    cfg = load_config_file(p)
    assert cfg.fit_chunk == 50 and cfg.fit.rv_range == 250.0 and cfg.prepare.mode == "bulge"


@pytest.mark.parametrize("cls", [ExtractConfig, PrepareConfig, FitConfig])
def test_every_stage_config_round_trips(cls):
    c = cls()
    assert from_mapping(cls, json.loads(json.dumps(to_mapping(c)))) == c
