"""The registries of the losses package (KD terms, difficulty policies, schedules, filtering scores):
every entry has its independent reference in losses_reference.py, the uniform KD-term call and
parameter check behave the same for every term, and the tables of docs/losses.md are the ones the
registries generate. `python tests/losses/test_registry.py --write` rewrites those tables."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

import losses
import losses_reference as ref

REGISTRIES = {
    "KD_TERMS": (losses.KD_TERMS, ref.REFERENCES),
    "KD_TERMS (torch)": (losses.KD_TERMS, ref.TORCH_REFERENCES),
    "DIFFICULTIES": (losses.DIFFICULTIES, ref.DIFFICULTY_REFERENCES),
    "SCHEDULES": (losses.SCHEDULES, ref.SCHEDULE_REFERENCES),
    "SCORES": (losses.SCORES, ref.SCORE_REFERENCES),
}
ENTRIES = [(registry, name) for registry, (entries, _) in REGISTRIES.items() for name in entries]
VOCAB = 11


@pytest.mark.parametrize("registry, name", ENTRIES)
def test_every_entry_has_a_reference(registry, name):
    entries, references = REGISTRIES[registry]
    assert entries[name].name == name, f"{registry}[{name!r}] is named {entries[name].name!r}"
    assert name in references, f"{registry}[{name!r}] has no reference in tests/losses/losses_reference.py"


@pytest.mark.parametrize("registry", REGISTRIES)
def test_every_reference_has_an_entry(registry):
    entries, references = REGISTRIES[registry]
    assert set(references) <= set(entries), f"references without a {registry} entry: {set(references) - set(entries)}"


@pytest.mark.parametrize("name", losses.KD_TERMS)
def test_check_params_fills_defaults_and_names_the_term_the_unknown_key_and_the_allowed_ones(name):
    term = losses.KD_TERMS[name]
    assert set(term.check_params()) == set(term.param_names) == set(term.check_params({}))
    message = f"kd_kwargs: ['temperatur'] not parameters of {name!r}; allowed: {list(term.param_names)}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        term.check_params({"temperatur": 2.0})


def batch(seed=0):
    rng = np.random.default_rng(seed)
    student, teacher = rng.normal(0, 2, (2, 3, VOCAB)).astype(np.float32), rng.normal(0, 2, (2, 3, VOCAB))
    labels = rng.integers(0, VOCAB, (2, 3))
    labels[0, 1] = -100
    return student, teacher.astype(np.float32), labels


@pytest.mark.parametrize("name", losses.KD_TERMS)
def test_labels_are_read_only_by_the_terms_that_need_them(name):
    term = losses.KD_TERMS[name]
    student, teacher, labels = batch()
    with_labels = np.asarray(term(student, teacher, labels, temperature=2.0))
    if term.needs_labels:
        assert with_labels[0, 1] == 0  # label -100: ignored like a masked token
        with pytest.raises(ValueError, match=f"{name}: needs the labels"):
            term(student, teacher, None)
    else:
        assert with_labels[0, 1] > 0
        np.testing.assert_array_equal(with_labels, np.asarray(term(student, teacher, None, temperature=2.0)))


def other_params(term: losses.KDTerm) -> dict[str, float]:
    """0.9 times each default: parameters other than the defaults, valid for every term."""
    return {key: 0.9 * value for key, value in term.check_params().items()}


@pytest.mark.parametrize("name", losses.KD_TERMS)
def test_parameters_other_than_the_defaults_match_the_reference(name):
    term = losses.KD_TERMS[name]
    student, teacher, labels = batch(2)
    labels = labels % VOCAB  # every token kept
    args = (student, teacher, labels) if term.needs_labels else (student, teacher)
    np.testing.assert_allclose(np.asarray(term(student, teacher, labels, temperature=2.0, **other_params(term))),
                               ref.REFERENCES[name](*args, **other_params(term), temperature=2.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [name for name in losses.KD_TERMS if hasattr(losses, name)])
def test_public_function_is_its_table_entry(name):
    """The named functions (losses.forward_kl, ...) pass every argument through to the table."""
    term, function = losses.KD_TERMS[name], getattr(losses, name)
    student, teacher, labels = batch(1)
    mask = np.array([[True, False, True], [True, True, True]])
    params = other_params(term)
    args = (student, teacher, labels) if term.needs_labels else (student, teacher)
    np.testing.assert_array_equal(
        np.asarray(function(*args, temperature=1.5, mask=mask, chunk_size=2, **params)),
        np.asarray(term(student, teacher, labels, temperature=1.5, mask=mask, chunk_size=2, **params)))
    if params:  # and they reach the divergence
        assert not np.array_equal(np.asarray(function(*args, **params)), np.asarray(function(*args)))


DOCS = Path(__file__).resolve().parents[2] / "docs" / "losses.md"
WRITE = "python tests/losses/test_registry.py --write"


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows])


def kd_terms_table() -> str:
    rows = []
    for term in losses.KD_TERMS.values():
        params = ", ".join(f"{key}={value}" for key, value in term.check_params().items())
        rows.append((f"`{term.name}({params})`" if params else f"`{term.name}`", term.formula,
                     "yes" if term.needs_labels else "", term.reference))
    return markdown_table(("name (defaults)", "formula", "reads the labels", "reference"), rows)


def schedules_table() -> str:
    return markdown_table(("schedule", "base(step)", "fields it reads"), [
        (f"`{s.name}`", s.formula, ", ".join(f"`{field}`" for field in s.fields)) for s in losses.SCHEDULES.values()])


def difficulties_table() -> str:
    return markdown_table(("difficulty", "g", "statistics it reads"), [
        (f"`{d.name}`", d.formula, ", ".join(f"`{key}`" for key in d.statistics) or "none")
        for d in losses.DIFFICULTIES.values()])


def scores_table() -> str:
    return markdown_table(("score", "row score"), [(f"`{s.name}`", s.formula) for s in losses.SCORES.values()])


TABLES = {"KD_TERMS": kd_terms_table, "SCHEDULES": schedules_table, "DIFFICULTIES": difficulties_table,
          "SCORES": scores_table}


def section(name: str) -> re.Pattern:
    """The generated text between the markers of a table: `<!-- NAME: ... -->` and `<!-- /NAME -->`."""
    return re.compile(rf"(<!-- {name}: [^\n]* -->\n)(.*?)(\n<!-- /{name} -->)", re.DOTALL)


def regenerated(text: str) -> str:
    for name, make in TABLES.items():
        text, found = section(name).subn(lambda match, make=make: match[1] + make() + match[3], text)
        if found != 1:
            raise ValueError(f"docs/losses.md: the markers of the {name} table are missing or repeated")
    return text


@pytest.mark.parametrize("name", TABLES)
def test_docs_tables_are_the_registries(name):
    found = section(name).search(DOCS.read_text())
    assert found, f"docs/losses.md: no <!-- {name}: ... --> ... <!-- /{name} --> markers"
    assert found[2] == TABLES[name](), f"docs/losses.md: the {name} table is out of date; run `{WRITE}`"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {WRITE}")
    DOCS.write_text(regenerated(DOCS.read_text()))
