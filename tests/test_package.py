"""The package as pip installs it, away from the checkout: the BPF program text ships in the
wheel (bpf/memhp.c stays at the checkout's top level, DESIGN.md §8)."""

import os
import subprocess
import sys

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_installed_wheel_builds_the_probe_program(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "-w", str(tmp_path / "dist"), TOP], check=True,
                   capture_output=True, timeout=300)
    [wheel] = os.listdir(tmp_path / "dist")
    # a venv that sees the test venv's packages (bcc, prometheus_client), not the checkout
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "v")],
                   check=True, timeout=120)
    py = str(tmp_path / "v" / "bin" / "python")
    subprocess.run([py, "-m", "pip", "-q", "install", "--no-deps", str(tmp_path / "dist" / wheel)],
                   check=True, capture_output=True, timeout=300)
    out = subprocess.run([py, "-c", "import observer, sys; from observer.probes import program, loader; "
                          "print(observer.__file__); print(program.template_path()); "
                          "sys.stdout.write(loader.Probes().text('kprobe'))"],
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    module, template, text = out.stdout.split("\n", 2)
    assert module.startswith(str(tmp_path / "v")) and template.startswith(str(tmp_path / "v"))
    assert "int enter_0(struct pt_regs *ctx)" in text and "#define OFF_zone_spanned_pages" in text
