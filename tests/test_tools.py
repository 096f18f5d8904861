"""The tools/choose_*.py scripts' table machinery: a killed run resumes from the rows it printed,
and rows it did not print are measured."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import held_out

LOG = """\
choosing the start on held-out calibration images
| model | width | start | KL held-out | agreement % | top-1 % | s |
| --- | --- | --- | ---: | ---: | ---: | ---: |
| resnet20_cifar10 | W4A4 | nearest | 0.0351 | 95.10 | 93.27 | 388 |
| resnet20_cifar10 | W4A4 | gptq | 0.0158 | 96.30 | 93.66 |
  resnet20_cifar10 W2A4: refining 3/19
"""


def test_a_killed_run_resumes_from_its_complete_printed_rows(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(LOG)
    rows = held_out.printed_rows(log, ("nearest", "gptq"))
    key = "| resnet20_cifar10 | W4A4 | nearest |"
    assert list(rows) == [key]  # the gptq row was cut short by the kill; the header is no row
    assert rows[key] == (LOG.splitlines()[3], 0.0351)


def test_a_row_is_reused_when_printed_and_measured_otherwise():
    key = "| resnet20_cifar10 | W4A4 | nearest |"
    done = {key: ("the printed row", 0.0351)}
    calls = []

    def measure():
        calls.append(True)
        return {"kl": 0.01584, "agreement": 0.963, "top1": 0.93664, "seconds": 391.6}

    assert held_out.table_row(key, done, measure) == ("the printed row", 0.0351)
    assert not calls
    other = "| resnet20_cifar10 | W4A4 | gptq |"
    line, kl = held_out.table_row(other, done, measure)
    assert calls and kl == 0.01584
    assert line == f"{other} 0.0158 | 96.30 | 93.66 | 392 |"
