"""Findings of a new user's trial of the documented commands, each a property that failed before
its fix."""

from __future__ import annotations

import json

import torch

from lightning_ext.cli import main as cli_main


def test_refine_schedule_keeps_the_recorded_norm_kind(tmp_path, capsys):
    # --norm l1 on a record of l2 norms refined them with l1's power and wrote them down as l1
    record = tmp_path / "grad_norms.pt"
    torch.save({"grad_norms": [torch.linspace(1.0, 2.0, 20)], "norm": ["l2"]}, record)
    out = tmp_path / "refined.pt"
    assert cli_main(["refine-schedule", str(record), "-o", str(out), "--norm", "l1"]) == 2
    err = capsys.readouterr().err
    assert "records l2 gradient norms, not l1" in err and "--power" in err
    assert not out.exists()
    assert cli_main(["refine-schedule", str(record), "-o", str(out), "--norm", "l2"]) == 0
    assert torch.load(out)["norm"] == ["l2"]
    bare = tmp_path / "norms.txt"  # a file without a kind: --norm names it
    bare.write_text("\n".join(str(1.0 + i / 10) for i in range(20)))
    out = tmp_path / "from_text.pt"
    assert cli_main(["refine-schedule", str(bare), "-o", str(out), "--norm", "l1"]) == 0
    assert torch.load(out)["norm"] == ["l1"]


def test_soup_names_what_a_folder_ingredient_should_hold(tmp_path, capsys):
    # a folder that is no checkpoint was only said not to be a distributed checkpoint, though a
    # Hugging Face model folder is accepted too; a PEFT adapter folder is pointed to merge-adapters
    good = tmp_path / "a.pt"
    torch.save({"w": torch.ones(2)}, good)
    empty = tmp_path / "empty"
    empty.mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    out = str(tmp_path / "soup.pt")
    assert cli_main(["soup", str(good), str(empty), "-o", out]) == 2
    err = capsys.readouterr().err
    assert "not a distributed checkpoint" in err and "model.safetensors" in err
    assert cli_main(["soup", str(good), str(adapter), "-o", out]) == 2
    err = capsys.readouterr().err
    assert "holds a PEFT adapter" in err and "lightning-ext merge-adapters" in err


def test_merge_adapters_names_the_options_its_method_ignores(tmp_path, capsys):
    # `merge-adapters --density 0.5` (default task-arithmetic) dropped --density without a word,
    # where `soup` warns; both now share the warning
    adapter = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2)}
    config = '{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["m"]}'
    folders = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(config)
        torch.save(adapter, tmp_path / name / "adapter_model.bin")
        folders.append(str(tmp_path / name))
    out = str(tmp_path / "merged")
    assert cli_main(["merge-adapters", *folders, "-o", out, "--density", "0.5"]) == 0
    assert "--method task-arithmetic does not use --density (ignored)" in capsys.readouterr().err


def test_a_commands_warnings_are_one_line_for_its_user(tmp_path, capsys):
    # they were printed by Python's default hook: a source path, a line number and a code line
    norms = tmp_path / "rising.txt"  # norms that start low: a degenerate paper schedule
    norms.write_text("\n".join(str(min(1.0, 0.1 + i / 30)) for i in range(200)))
    out = tmp_path / "refined.pt"
    assert cli_main(["refine-schedule", str(norms), "-o", str(out), "--paper"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("lightning-ext refine-schedule: warning: The refined schedule")
    assert ".py:" not in err and len(err.strip().splitlines()) == 1
    # the advice names the command's own options, not the Python arguments
    assert "--exclude-initial" in err and "exclude_initial=" not in err


def test_posthoc_ema_refuses_a_width_out_of_range_before_making_the_output_folder(tmp_path, capsys):
    # the output's folder was made (and left empty) before --sigma-rel was checked
    out = tmp_path / "new" / "ema.pt"
    code = cli_main(["posthoc-ema", str(tmp_path / "missing"), str(out), "--sigma-rel", "0.5"])
    assert code == 2 and "sigma_rel must lie in (0, 0.28)" in capsys.readouterr().err
    assert not out.parent.exists()


def test_a_refused_command_leaves_no_empty_output_folder(tmp_path, capsys):
    # check_output probes the output's folder before the work; a command refused after the probe
    # (a missing input, a bad option) left that folder behind, empty
    good = tmp_path / "a.pt"
    torch.save({"w": torch.ones(2)}, good)
    runs = [
        ["soup", str(good), str(tmp_path / "missing.pt"), "-o", str(tmp_path / "s" / "o.pt")],
        ["export-ema", str(tmp_path / "missing.ckpt"), str(tmp_path / "e" / "deep" / "o.pt")],
        ["sparse-export", str(tmp_path / "missing.ckpt"), str(tmp_path / "x" / "o.pt")],
    ]
    for argv in runs:
        assert cli_main(argv) == 2
        assert "missing" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]
    out = tmp_path / "w" / "soup.pt"  # a command that succeeds makes the folder for good
    assert cli_main(["soup", str(good), str(good), "-o", str(out)]) == 0
    assert out.exists()


def _norms_file(folder):
    record = folder / "grad_norms.pt"
    torch.save({"grad_norms": [torch.linspace(2.0, 1.0, 20)], "norm": ["l2"]}, record)
    return record


def test_refine_schedule_outputs_never_land_on_one_another(tmp_path, capsys):
    # `-o s.json` wrote the schedule, then its JSON summary over it (schedule lost); `--plot`
    # equal to -o or to the summary replaced them with a PNG; all reported success
    record = _norms_file(tmp_path)
    s, png = str(tmp_path / "s.pt"), str(tmp_path / "s.png")
    runs = [
        (["-o", str(tmp_path / "s.json")], "the schedule and the schedule's JSON summary both"),
        (["-o", s, "--plot", s], "s.pt: it is a PNG; name it .png"),
        (["-o", s, "--plot", str(tmp_path / "s.json")], "s.json: it is a PNG; name it .png"),
        (["-o", png, "--plot", png], "the schedule and the plot both"),
    ]
    for options, expected in runs:
        assert cli_main(["refine-schedule", str(record), *options]) == 2
        assert expected in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grad_norms.pt"]


def test_refine_schedule_names_its_outputs_as_they_are_read_back(tmp_path, capsys):
    # `-o refined.txt` wrote a torch.save file that load_schedule (and the command itself) then
    # read as text: a bare UnicodeDecodeError naming no file; `--plot x.txt` wrote a PNG there
    record = _norms_file(tmp_path)
    assert cli_main(["refine-schedule", str(record), "-o", str(tmp_path / "refined.txt")]) == 2
    assert "binary (torch.save), not the .txt file" in capsys.readouterr().err
    plot = ["--plot", str(tmp_path / "plot.txt")]
    assert cli_main(["refine-schedule", str(record), "-o", str(tmp_path / "r.pt"), *plot]) == 2
    assert "plot.txt: it is a PNG; name it .png" in capsys.readouterr().err
    binary = tmp_path / "norms.txt"  # a binary file under a text name: one line naming it
    torch.save(torch.ones(3), binary)
    assert cli_main(["refine-schedule", str(binary), "-o", str(tmp_path / "r.pt")]) == 2
    err = capsys.readouterr().err
    assert f"{binary} is not a text file" in err and "utf-8" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grad_norms.pt", "norms.txt"]


def test_binary_outputs_under_text_names_are_refused_before_any_work(tmp_path, capsys):
    # export-ema, posthoc-ema, sparse-export, soup and prune-select wrote torch.save (zip) files
    # under .txt/.csv/.json names: prune-select's help promises .pt or a .json list
    good = tmp_path / "a.pt"
    torch.save({"w": torch.ones(2)}, good)
    missing = str(tmp_path / "missing")  # refused on the name before the input is read
    runs = [
        ["export-ema", missing, str(tmp_path / "ema.txt")],
        ["posthoc-ema", missing, str(tmp_path / "ema.csv"), "--sigma-rel", "0.1"],
        ["sparse-export", missing, str(tmp_path / "sparse.json")],
        ["soup", str(good), str(good), "-o", str(tmp_path / "soup.yaml")],
        ["prune-select", missing, "--keep", "0.5", "--out", str(tmp_path / "keep.txt")],
    ]
    for argv in runs:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "the output is binary (torch.save)" in err and "name it .pt" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]
    for name in ("soup.safetensors.index.json", "soup.ckpt"):  # still written as before
        assert cli_main(["soup", str(good), str(good), "-o", str(tmp_path / name)]) == 0


def test_every_option_of_every_command_says_what_it_does():
    # refine-schedule's --exclude-initial, --floor and --blend had no help text at all
    import argparse

    from lightning_ext.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [
        f"{name} {action.option_strings[0]}"
        for name, parser in commands.choices.items()
        for action in parser._actions
        if action.option_strings and not action.help
    ]
    assert len(commands.choices) == 7 and bare == []


def test_merge_adapters_output_is_not_named_as_a_file(tmp_path, capsys):
    # `-o merged.safetensors` made a folder of that name, which soup and load_file then take
    # for a safetensors file
    adapter = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2)}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["m"]}'
    )
    torch.save(adapter, tmp_path / "a" / "adapter_model.bin")
    folder = str(tmp_path / "a")
    for name in ("merged.safetensors", "merged.pt"):
        assert cli_main(["merge-adapters", folder, folder, "-o", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "it is a folder" in err and "name a folder" in err
        assert not (tmp_path / name).exists()
    assert cli_main(["merge-adapters", folder, folder, "-o", str(tmp_path / "merged")]) == 0


def test_a_binary_file_of_another_format_is_named_once(tmp_path, capsys):
    # a PNG given as a checkpoint read "is not a file written by torch.save (it starts with
    # b'\x89PNG'), not a file written by torch.save"
    image = tmp_path / "plot.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert cli_main(["export-ema", str(image), str(tmp_path / "ema.pt")]) == 2
    err = capsys.readouterr().err
    assert f"{image} is binary data of another format (it starts with b'\\x89PNG')" in err
    assert err.count("torch.save") == 1


def test_soup_model_option_names_a_function_the_module_lacks(tmp_path, capsys, monkeypatch):
    # `--model mk:nomodel` (a typo) said "'mk:nomodel' is not a callable", as if it existed
    (tmp_path / "mk_user.py").write_text("def model():\n    return None\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    good = tmp_path / "a.pt"
    torch.save({"w": torch.ones(2)}, good)
    bn = ["--model", "mk_user:nomodel", "--recalibrate-bn", "mk_user:model"]
    assert cli_main(["soup", str(good), str(good), "-o", str(tmp_path / "s.pt"), *bn]) == 2
    err = capsys.readouterr().err
    assert "mk_user" in err and "has no 'nomodel'" in err and "not a callable" not in err


def test_a_checkpoint_of_several_states_names_the_commands_option(tmp_path, capsys):
    # export-ema and sparse-export said "choose one with state_key", the Python argument's name
    ckpt = tmp_path / "two.ckpt"
    states = {"EMA{'decay': 0.9}": {"shadow": {}}, "EMA{'decay': 0.99}": {"shadow": {}}}
    states |= {f"DynamicSparseTraining{{'density': {d}}}": {"masks": {}} for d in (0.1, 0.2)}
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": states}, ckpt)
    for command in ("export-ema", "sparse-export"):
        assert cli_main([command, str(ckpt), str(tmp_path / "out.pt")]) == 2
        err = capsys.readouterr().err
        assert "holds several" in err and "--state-key (state_key= in Python)" in err, err


def test_prune_select_names_the_options_its_strategy_ignores(tmp_path, capsys):
    # `prune-select --offset 0.2` (default strategy hardest) silently kept the hardest examples,
    # the ones the user asked to drop; soup and merge-adapters warn about ignored options
    from lightning_ext.io.scores import write_scores

    scores = tmp_path / "scores.pt"
    values, labels = torch.linspace(0.0, 1.0, 20), torch.arange(20) % 2
    write_scores(scores, values, labels, score="el2n", run_name=None, task="classification")
    common = ["prune-select", str(scores), "--keep", "0.5", "--offset", "0.2", "--strata", "3"]
    assert cli_main([*common, "--out", str(tmp_path / "hard.pt")]) == 0
    err = capsys.readouterr().err
    assert "--strategy hardest does not use --offset, --strata (ignored)" in err
    assert len(err.strip().splitlines()) == 1
    hard = torch.load(tmp_path / "hard.pt")
    assert torch.equal(hard, torch.arange(10, 20))  # the hardest half, as without the options
    argv = [*common, "--strategy", "offset", "--out", str(tmp_path / "offset.pt")]
    assert cli_main(argv) == 0  # offset uses --offset (and warns about --strata only)
    assert "does not use --strata (ignored)" in capsys.readouterr().err
    assert torch.equal(torch.load(tmp_path / "offset.pt"), torch.arange(6, 16))
    out = tmp_path / "keep.JSON"  # a .json list whatever the case of its suffix
    assert cli_main(["prune-select", str(scores), "--keep", "0.5", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == list(range(10, 20))


def test_refine_schedule_refuses_options_its_paper_formula_would_drop(tmp_path, capsys):
    # `--paper --blend 0.5` wrote the paper's schedule without the blend, silently; `--window`
    # with a fractional --smoothing was dropped without a word (and recorded as used)
    record = _norms_file(tmp_path)
    paper = ["refine-schedule", str(record), "-o", str(tmp_path / "p.pt"), "--paper"]
    assert cli_main([*paper, "--blend", "0.5", "--power", "1"]) == 2
    assert "--paper is the paper's exact formula, which --power, --blend" in capsys.readouterr().err
    assert cli_main(paper) == 0 and torch.load(tmp_path / "p.pt")["blend"] == 0.0
    capsys.readouterr()
    out = tmp_path / "w.pt"
    argv = ["refine-schedule", str(record), "-o", str(out), "--smoothing", "0", "--window", "5"]
    assert cli_main(argv) == 0
    assert "--smoothing 0 does not use --window (ignored)" in capsys.readouterr().err
    assert torch.load(out)["window"] != 5
    argv = ["refine-schedule", str(record), "-o", str(tmp_path / "b.pt"), "--blend", "0.2"]
    assert cli_main(argv) == 0 and torch.load(tmp_path / "b.pt")["blend"] == 0.2


def test_merge_adapters_of_different_models_names_both_folders(tmp_path, capsys):
    # the merge refused them naming "ingredient 1" and "the reference", no folder
    config = '{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["m"]}'
    for name, width in (("a", 3), ("c", 5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(config)
        state = {"m.lora_A.weight": torch.ones(2, width), "m.lora_B.weight": torch.ones(4, 2)}
        torch.save(state, tmp_path / name / "adapter_model.bin")
    folders = [str(tmp_path / "a"), str(tmp_path / "c")]
    assert cli_main(["merge-adapters", *folders, "-o", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert f"adapter 1 ({folders[1]}): module 'm' updates a weight of shape (4, 5)" in err
    assert f"adapter 0 ({folders[0]}) one of shape (4, 3)" in err
    assert not (tmp_path / "merged").exists()


def test_soup_says_when_a_file_is_given_twice(tmp_path, capsys):
    # `soup run*/last.ckpt run1/last.ckpt` averaged run1 twice (a 2:1 weighting), silently
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.zeros(2)}, a)
    torch.save({"w": torch.ones(2)}, b)
    out = tmp_path / "soup.pt"
    assert cli_main(["soup", str(a), str(b), str(tmp_path / "." / "a.pt"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: ingredients 0 and 2 are the same file" in err and "counts twice" in err
    assert cli_main(["soup", str(a), str(b), "-o", str(tmp_path / "two.pt")]) == 0
    assert "same file" not in capsys.readouterr().err
