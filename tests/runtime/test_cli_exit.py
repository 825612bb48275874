"""How the ``sdft`` command ends: under torchrun, a finished run leaves with its own exit status after its
exit handlers and output, not at the mercy of gloo's threads in interpreter finalisation."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

ROOT = Path(__file__).parents[2]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_a_process_in_a_group_leaves_with_its_status_after_its_exit_handlers_and_output(tmp_path):
    code = textwrap.dedent(f"""
        import atexit, pathlib, sys
        import torch.distributed as dist
        from sdft.runtime.distributed import leave
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        atexit.register(lambda: pathlib.Path("{tmp_path / 'handler'}").write_text(str(dist.is_initialized())))
        sys.stdout.write("unflushed")
        leave(3)
    """)
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert out.stdout == "unflushed"
    assert (tmp_path / "handler").read_text() == "True"  # handlers run while the group still stands


def test_the_cli_under_torchrun_trains_and_exits_zero(tmp_path):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    model = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(29000 + os.getpid() % 500), "-m", "sdft.cli",
           "train", "--model", str(model), "--data", str(data), "--no-eval", "--set", f"output_dir={tmp_path / 'run'}",
           "max_steps=2", "progress_bar=false", "device=cpu", "num_generations=2", "max_completion_length=4",
           "per_device_train_batch_size=1"]
    out = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "FutureWarning" not in out.stderr
    assert (tmp_path / "run" / "final_model" / "config.json").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
