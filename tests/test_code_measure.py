"""The code measure: every problem is solvable by its reference body, a wrong body fails, and the
sandbox refuses what a careless model might write (an endless loop, a write outside its folder, a
socket, a subprocess) without harming this machine."""

import os
from pathlib import Path

import pytest

from stat_core.evaluation.code import code_problems, function_body, run_candidate

PROBLEMS = code_problems()


def test_at_least_forty_problems_with_distinct_names():
    assert len(PROBLEMS) >= 40 and len({p.name for p in PROBLEMS}) == len(PROBLEMS)


def test_every_reference_solution_passes_and_a_wrong_one_fails():
    # One subprocess per problem, as the measure runs them.
    failed = [p.name for p in PROBLEMS if not run_candidate(p.prompt + p.solution + "\n\n" + p.tests).passed]
    assert failed == []
    wrong = [p for p in PROBLEMS[:8]]
    assert not any(run_candidate(p.prompt + "    return None\n\n" + p.tests).passed for p in wrong)


def test_a_loop_is_stopped_at_the_time_limit():
    result = run_candidate("while True:\n    pass\n", time_limit=1.0)
    assert result.status == "timeout" and result.seconds < 5


def test_writing_outside_the_scratch_folder_is_refused(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    for program in (f"open({str(target)!r}, 'w').write('gone')\n",
                    f"import os\nos.remove({str(target)!r})\n",
                    f"import pathlib\npathlib.Path({str(target)!r}).write_text('gone')\n",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n"):
        result = run_candidate(program)
        assert result.status == "failed" and "sandbox" in result.detail, program
    assert target.read_text() == "keep me"


def test_writing_inside_the_scratch_folder_is_allowed():
    assert run_candidate("open('out.txt', 'w').write('ok')\nassert open('out.txt').read() == 'ok'\n").passed


@pytest.mark.parametrize("program", [
    "import socket\nsocket.create_connection(('127.0.0.1', 9))\n",
    "import _socket\n",
    "import subprocess\nsubprocess.run(['true'])\n",
    "import os\nos.system('true')\n",
    "import os\nos.fork()\n",
    "import ctypes\n",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')\n",
])
def test_network_processes_and_ctypes_are_refused(program):
    result = run_candidate(program)
    assert result.status == "failed" and ("sandbox" in result.detail or "PermissionError" in result.detail), \
        result.detail


def test_a_huge_allocation_fails_instead_of_filling_memory():
    result = run_candidate("x = bytearray(4 * 2**30)\n")
    assert result.status == "failed" and "MemoryError" in result.detail


def test_the_completion_is_cut_at_the_function_end():
    body = "    return a + b\n\n\nprint(add(1, 2))\ndef other():\n    pass\n"
    assert function_body(body) == "    return a + b\n"
    assert function_body("    x = 1\n\n    return x\n```\nmore") == "    x = 1\n\n    return x\n"
    assert not Path(os.getcwd(), "out.txt").exists()
