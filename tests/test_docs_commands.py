"""Every command line of the README's and docs' shell blocks runs as written.

Each ``bash`` block's ``ema-callbacks ...`` and ``python -c ...`` lines run in order in a fresh
folder that holds the inputs the page speaks of (``ema.pt``, ``snapshots/``, a Lightning
``last.ckpt``, a transformers ``out/checkpoint-500``, a Composer ``runs/ep3-ba300-rank0.pt``,
post-hoc snapshot folders), made here by short real trainings; each must exit 0. A line that
needs a trainer this environment lacks is still parsed by the real argument parser (its flags
exist, its values are valid), and runs in the environment that has it (``make test`` runs this
file in ``.venv`` and in ``.venv-composer``). ``pip``, ``make`` and ``.venv*/bin/...`` lines are
the repository's own commands: the wheel check and ``make test`` itself run those.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ema_callbacks.cli import _parser, main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "wheel"))

from doc_objects import namespace  # noqa: E402

SHELL = re.compile(r"^```(?:bash|sh|shell|console)\n(?P<body>.*?)^```", re.M | re.S)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The distribution a line needs, by what it names (the trainer behind its input or config).
NEEDS = {
    "ba300-rank0.pt": "mosaicml",
    ".ckpt": "lightning",
    "lightning": "lightning",
    "my.yaml": "lightning",  # run_config.md writes it from lightning_digits
    "checkpoint-500": "transformers",
    "transformers": "transformers",
    "gpt2.yaml": "transformers",
}


def commands(text: str) -> list[tuple[int, list[list[str]]]]:
    """``(line, [argv, ...])`` of every shell block with a line this file runs.

    >>> commands("```bash\\nema-callbacks halflife --half-life 2ep  # c\\npip install x\\n```\\n")
    [(1, [['ema-callbacks', 'halflife', '--half-life', '2ep']])]
    """
    found = []
    for m in SHELL.finditer(text):
        body = m.group("body").replace("\\\n", " ")
        argvs = []
        for line in body.splitlines():
            argv = shlex.split(line, comments=True)
            if argv and (argv[0] == "ema-callbacks" or argv[:2] == ["python", "-c"]):
                argvs.append(argv)
        if argvs:
            found.append((text.count("\n", 0, m.start("body")), argvs))
    return found


CASES = [
    pytest.param(argvs, id=f"{page.relative_to(ROOT)}:{line}")
    for page in PAGES
    for line, argvs in commands(page.read_text())
]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _missing(argv: list[str]) -> set[str]:
    line = " ".join(argv)
    return {d for key, d in NEEDS.items() if key in line and not _installed(d)}


# -- the inputs the pages name -------------------------------------------------------------


def _plain(folder: Path) -> None:
    """What the README's plain-loop quickstarts leave: ``ema.pt`` and ``snapshots/``."""
    from ema_callbacks import EMA

    ns = namespace("plain")
    model, optimizer = ns["model"], ns["optimizer"]
    ema = EMA(model, half_life="5ba")
    snap = EMA(model, sigma_rel=[0.05, 0.10], snapshot_every="4ba", snapshot_folder=folder / "s")
    for x, y in ns["loader"]:
        loss = ns["loss_fn"](model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.step(model)
        snap.step(model)
    torch.save(ema.state_dict(), folder / "ema.pt")
    (folder / "s").rename(folder / "snapshots")


def _long_snapshots(folder: Path) -> None:
    """Snapshots up to 10000ba, for the pages' ``--at 5000ba`` / ``--at 10000ba``."""
    from ema_callbacks import EMA

    model = torch.nn.Linear(4, 2)
    ema = EMA(model, sigma_rel=[0.05, 0.10], snapshot_every="2500ba", snapshot_folder=folder)
    with torch.no_grad():
        for i in range(10000):
            model.weight.add_(0.001 * ((i % 7) - 3))
            ema.step(model)


def _lightning(folder: Path) -> None:
    """``lightning_logs/version_0/checkpoints/last.ckpt`` (and a copy as ``last.ckpt``) of a
    module whose network is its attribute ``model``."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ema_callbacks.lightning import EMACallback

    ns = namespace("lightning")
    trainer = L.Trainer(
        max_epochs=1,
        default_root_dir=folder,
        callbacks=[EMACallback(half_life="4ba"), ModelCheckpoint(save_last=True)],
        logger=L.pytorch.loggers.CSVLogger(folder, name="lightning_logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ns["module"], datamodule=ns["dm"])
    last = folder / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    shutil.copy(last, folder / "last.ckpt")


def _transformers(folder: Path) -> None:
    """``out/checkpoint-500`` of a tiny GPT-2 with EMAs named ``ema_50ba`` and ``ema_1000ba``."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from ema_callbacks.transformers import EMATrainerCallback

    class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.randint(0, 32, (8,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    args = TrainingArguments(
        output_dir=str(folder / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    callback = EMATrainerCallback(half_life=["50ba", "1000ba"])
    Trainer(
        model=GPT2LMHeadModel(config), args=args, train_dataset=Tokens(), callbacks=[callback]
    ).train()
    (folder / "out" / "checkpoint-2").rename(folder / "out" / "checkpoint-500")


def _composer(folder: Path) -> None:
    """A Composer checkpoint, ``runs/ep3-ba300-rank0.pt``."""
    from composer import Trainer

    from ema_callbacks.composer import EMA

    ns = namespace("composer")
    Trainer(
        model=ns["model"],
        train_dataloader=ns["train_dl"],
        max_duration="1ep",
        algorithms=[EMA(half_life="4ba")],
        save_folder=str(folder / "runs"),
        save_filename="ep{epoch}-ba{batch}-rank{rank}.pt",
        progress_bar=False,
    ).fit()
    (folder / "runs" / "ep1-ba8-rank0.pt").rename(folder / "runs" / "ep3-ba300-rank0.pt")


# A path a line names -> what makes it; each is made once per session, copied per block.
MAKERS: dict[str, tuple[str | None, Callable[[Path], None]]] = {
    "ema.pt": (None, _plain),
    "snapshots": (None, _plain),
    "runs/snapshots": (None, _long_snapshots),
    "checkpoints/ema_snapshots": (None, _long_snapshots),
    "lightning_logs": ("lightning", _lightning),
    "last.ckpt": ("lightning", _lightning),
    "out/checkpoint-500": ("transformers", _transformers),
    "runs/ep3-ba300-rank0.pt": ("mosaicml", _composer),
}


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Path], None]:
    made: dict[Callable[[Path], None], Path] = {}

    def place(name: str, into: Path) -> None:
        maker = MAKERS[name][1]
        if maker not in made:
            made[maker] = tmp_path_factory.mktemp(maker.__name__.strip("_"))
            maker(made[maker])
        source = made[maker] / ("." if maker is _long_snapshots else name)
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy(source, target)

    return place


def test_every_page_with_commands_is_covered() -> None:
    pages = {case.id.split(":")[0] for case in CASES}
    assert {"README.md", "docs/cli.md", "docs/run_config.md", "docs/profiles.md"} <= pages


@pytest.mark.parametrize("argvs", CASES)
def test_commands_run_as_written(
    argvs: list[list[str]],
    inputs: Callable[[str, Path], None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "docs" / "images").mkdir(parents=True)  # as the root of a clone or the sdist
    monkeypatch.chdir(tmp_path)
    ran = []
    for argv in argvs:
        line = " ".join(argv)
        if argv[0] == "ema-callbacks":
            try:  # the flags and values as written (argparse exits 2 if not, 0 for --version)
                _parser().parse_args(argv[1:])
            except SystemExit as done:
                assert done.code == 0, f"{line!r}: {capsys.readouterr().err}"
        if _missing(argv):
            continue
        for name, (needs, _) in MAKERS.items():
            if re.search(rf"(^|[\s/]){re.escape(name)}(/|\s|$)", line) and (
                needs is None or _installed(needs)
            ):
                inputs(name, tmp_path)
        if argv[0] == "ema-callbacks":
            code = main(argv[1:])
            assert code == 0, f"{line!r} exited {code}: {capsys.readouterr().err[-2000:]}"
        else:
            done = subprocess.run(
                [sys.executable, *argv[1:]], capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, f"{line!r} failed: {done.stderr[-2000:]}"
        ran.append(line)
    if not ran:
        needed = sorted(set().union(*(_missing(a) for a in argvs)))
        pytest.skip(f"parsed only: needs {', '.join(needed)}")
