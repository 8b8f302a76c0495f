"""The model ledger: a hash chain of released versions that names the first tampered entry."""

from __future__ import annotations

import json

import pytest

from hub.ledger import GENESIS, Ledger, LedgerError, verify
from wearfl.cli import main


def write_three(path) -> Ledger:
    ledger = Ledger(path)
    for v in (0, 1, 2):
        ledger.append(v, v, {"model.safetensors": f"{v:064x}"}, [f"{10 + v:064x}"] if v else [], time=100.0 + v)
    return ledger


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_written_ledger_verifies_and_links_each_entry(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = write_three(path)
    result = verify(path)
    entries = lines(path)
    assert (result.entries, result.last_version, result.head) == (3, 2, ledger.head)
    assert entries[0]["prev"] == GENESIS and entries[1]["prev"] == entries[0]["hash"]
    assert Ledger(path).head == ledger.head  # reopening continues the chain
    with pytest.raises(ValueError, match="already ends at v2"):
        ledger.append(2, 2, {}, [], time=0.0)


@pytest.mark.parametrize("edit, index", [
    (lambda e: e[1].update(updates=[]), 1),                                  # content edited
    (lambda e: e[2].update(hash="f" * 64), 2),                               # hash forged
    (lambda e: e.pop(1), 1),                                                 # entry dropped
    (lambda e: e.insert(1, e[2]), 1),                                        # entry replayed
    (lambda e: e[0].update(version=0, files={"model.safetensors": "0"}), 0),
])
def test_editing_any_entry_is_caught_at_that_entry(tmp_path, capsys, edit, index):
    path = tmp_path / "ledger.jsonl"
    write_three(path)
    entries = lines(path)
    edit(entries)
    path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    with pytest.raises(LedgerError) as caught:
        verify(path)
    assert caught.value.index == index
    assert main(["ledger", "verify", "--state", str(tmp_path)]) == 1
    assert f"ledger entry {index} " in capsys.readouterr().err


def test_a_cut_last_line_is_dropped_and_the_cli_reports_ok(tmp_path, capsys):
    path = tmp_path / "ledger.jsonl"
    write_three(path)
    with open(path, "ab") as f:
        f.write(b'{"index": 3, "vers')  # a crash mid-append
    with pytest.raises(LedgerError, match="entry 3"):
        verify(path)
    assert Ledger(path).count == 3  # opening repairs the tail
    assert main(["ledger", "verify", "--state", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "entries": 3, "head": Ledger(path).head,
                                                   "last_version": 2}
