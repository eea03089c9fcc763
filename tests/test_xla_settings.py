"""The suite's own XLA settings (tests/xla_settings.py): what this process and its children compile with."""

from __future__ import annotations

import os

import jax

from xla_settings import BIT_EXACT_XLA_OPTIONS, DEVICE_COUNT_FLAG, TEST_XLA_FLAGS, child_env, child_flags, with_test_flags


def test_this_process_has_the_suite_flags_and_eight_devices():
    for flag in TEST_XLA_FLAGS:
        assert flag in os.environ["XLA_FLAGS"].split()
    assert len(jax.devices()) == 8
    assert jax.config.values["jax_compilation_cache_dir"] == os.environ["JAX_COMPILATION_CACHE_DIR"]


def test_child_flags_replace_the_device_count_and_keep_the_rest():
    given = f"{DEVICE_COUNT_FLAG}=8 --xla_dump_to=/tmp/x {TEST_XLA_FLAGS[0]}"
    one_device = child_flags(given).split()
    assert not any(f.startswith(DEVICE_COUNT_FLAG) for f in one_device)
    assert "--xla_dump_to=/tmp/x" in one_device and sorted(set(one_device)) == sorted(one_device)
    assert set(TEST_XLA_FLAGS) <= set(one_device)
    assert child_flags(given, devices=2).split()[0] == f"{DEVICE_COUNT_FLAG}=2"
    # a flag the caller set to another value is left as the caller set it
    own = TEST_XLA_FLAGS[1].split("=")[0] + "=true"
    assert own in with_test_flags(own).split() and TEST_XLA_FLAGS[1] not in with_test_flags(own).split()


def test_child_env_shares_the_compile_cache_and_puts_paths_first(tmp_path):
    env = child_env(tmp_path)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)
    assert env["JAX_COMPILATION_CACHE_DIR"] == os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert DEVICE_COUNT_FLAG not in env["XLA_FLAGS"] and "JAX_NUM_CPU_DEVICES" not in env


def test_bit_exact_options_are_accepted_per_program():
    from jaxsft.infra import compile_options

    assert all(compile_options.accepted(name, value) for name, value in BIT_EXACT_XLA_OPTIONS.items())
