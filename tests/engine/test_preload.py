"""What the package does before torch is imported, checked in fresh processes (this one has torch already)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from napari_clearclip._preload import OPENMP_SPIN_COUNT

SHOW = "import {first}napari_clearclip, os; print(os.environ.get('GOMP_SPINCOUNT', 'unset'))"


def spin_count_after_import(extra_env: dict, torch_first: bool = False) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(extra_env)
    code = SHOW.format(first="torch, " if torch_first else "")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_importing_the_package_shortens_openmp_spinning_before_torch_loads():
    """GNU OpenMP reads its spin count once, when torch loads it: the package sets a short one first."""
    assert spin_count_after_import({}) == OPENMP_SPIN_COUNT


@pytest.mark.parametrize("users", [{"GOMP_SPINCOUNT": "123"}, {"OMP_WAIT_POLICY": "ACTIVE"}])
def test_a_users_openmp_settings_are_left_as_they_are(users):
    assert spin_count_after_import(users) == users.get("GOMP_SPINCOUNT", "unset")


def test_nothing_is_set_once_torch_is_loaded():
    """Too late to matter then: the environment (which subprocesses inherit) is left alone."""
    assert spin_count_after_import({}, torch_first=True) == "unset"
