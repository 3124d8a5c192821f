"""The final table of `distill run`: every model's validation bpb, each student against its control."""

from distill.rundir import control_for, format_table


def summary(bpb: dict, controls: list[str]) -> dict:
    return {"bpb": bpb, "controls": controls}


def test_one_control_serves_every_student():
    table = format_table(summary({"teacher": 1.5, "distilled": 1.8, "control": 2.0, "other": 2.2}, ["control"]))
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert "-10.0% (better)" in rows["distilled"] and "+10.0% (worse)" in rows["other"]
    assert "%" not in rows["teacher"] and "%" not in rows["control"]


def test_several_controls_pair_by_name_and_say_which():
    controls = ["scout-like-control", "maverick-like-control"]
    bpb = {"teacher": 1.5, "scout-like": 1.8, "scout-like-control": 2.0, "maverick-like": 2.7,
           "maverick-like-control": 3.0}
    rows = {line.split()[0]: line for line in format_table(summary(bpb, controls)).splitlines()[2:]}
    assert rows["scout-like"].endswith("-10.0% (better) vs scout-like-control")
    assert rows["maverick-like"].endswith("-10.0% (better) vs maverick-like-control")


def test_control_for_falls_back_to_the_first_control():
    assert control_for("distilled", ["control", "b-control"]) == "control"
    assert control_for("b", ["control", "b-control"]) == "b-control"
    assert control_for("x", []) is None
