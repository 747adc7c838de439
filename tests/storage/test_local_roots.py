"""Model names under local roots: resolution, shadowing, escapes, listing and revisions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from weightserve.errors import InvalidRequestError, ModelNotFoundError
from weightserve.storage.local import LocalRoots, local_revision


def make_model(root: Path, name: str, weight: str = "model.safetensors") -> Path:
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / weight).write_bytes(b"weights of " + name.encode())
    (model_dir / "config.json").write_text("{}")
    return model_dir


@pytest.fixture
def two_roots(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "first", tmp_path / "second"
    make_model(first, "org/shared")
    make_model(first, "org/only-first")
    make_model(second, "org/shared")
    make_model(second, "other/only-second", "pytorch_model.bin")
    return first, second


def test_names_resolve_under_roots(two_roots: tuple[Path, Path]) -> None:
    first, second = two_roots
    roots = LocalRoots([first, second])
    assert roots.resolve("org/only-first") == (first / "org/only-first").resolve()
    assert roots.resolve("other/only-second") == (second / "other/only-second").resolve()


def test_first_root_wins_and_shadowed_reports_duplicates(two_roots: tuple[Path, Path]) -> None:
    first, second = two_roots
    roots = LocalRoots([first, second])
    assert roots.resolve("org/shared") == (first / "org/shared").resolve()
    assert roots.list_models()["org/shared"] == first.resolve() / "org/shared"
    assert roots.shadowed() == {"org/shared": [first.resolve(), second.resolve()]}

    reversed_roots = LocalRoots([second, first])
    assert reversed_roots.resolve("org/shared") == (second / "org/shared").resolve()
    assert reversed_roots.shadowed() == {"org/shared": [second.resolve(), first.resolve()]}


def test_no_shadowing_with_disjoint_roots(tmp_path: Path) -> None:
    make_model(tmp_path / "a", "x/m1")
    make_model(tmp_path / "b", "x/m2")
    assert LocalRoots([tmp_path / "a", tmp_path / "b"]).shadowed() == {}


def test_missing_root_is_tolerated(tmp_path: Path) -> None:
    make_model(tmp_path / "real", "org/m")
    roots = LocalRoots([tmp_path / "does-not-exist", tmp_path / "real"])
    assert list(roots.list_models()) == ["org/m"]
    assert roots.resolve("org/m") == (tmp_path / "real/org/m").resolve()


@pytest.mark.fault("model name or symlink escaping the roots")
@pytest.mark.parametrize(
    "name",
    [
        "..",
        "../secret",
        "org/../../secret",
        "org/m/../../../secret",
        "/etc",
        "/",
        "",
        "org\\m",
        "..\\secret",
        "org/m\x00",
        "\x00",
        ".",
    ],
)
def test_escaping_or_malformed_names_are_not_found(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    make_model(root, "org/m")
    make_model(tmp_path, "secret")  # a real model just outside the root
    with pytest.raises(ModelNotFoundError) as info:
        LocalRoots([root]).resolve(name)
    message = str(info.value)
    assert message.startswith(f"model {name!r} ") and "org/m" not in message.replace(repr(name), "")


@pytest.mark.fault("model name or symlink escaping the roots", cases=3)
def test_symlink_pointing_outside_the_root_is_not_found(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = make_model(tmp_path / "elsewhere", "secret")
    (root / "org").mkdir(parents=True)
    (root / "org" / "link").symlink_to(outside, target_is_directory=True)
    (root / "toplink").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    roots = LocalRoots([root])
    for name in ("org/link", "toplink/secret", "toplink"):
        with pytest.raises(ModelNotFoundError, match=r"not under any --model-root"):
            roots.resolve(name)
    assert roots.list_models() == {}


@pytest.mark.fault("request past a static or model limit", cases=4)
def test_a_path_part_over_255_bytes_names_the_part_limit(tmp_path: Path) -> None:
    make_model(tmp_path, "org/m")
    roots = LocalRoots([tmp_path])
    for name in ("org/" + "x" * 256, "x" * 1020, "org/" + "\u00e9" * 128, "a/" * 30 + "b" * 300):
        with pytest.raises(InvalidRequestError, match=r"path part of \d+ bytes .*at most 255 bytes"):
            roots.resolve(name)
    with pytest.raises(ModelNotFoundError):
        roots.resolve("org/" + "y" * 255)  # at the limit: an absent model like any other


@pytest.mark.fault("model name or symlink escaping the roots", cases=4)
def test_a_lookup_the_file_system_refuses_is_not_found(tmp_path: Path) -> None:
    """ELOOP, ENOTDIR, EACCES: the name is the caller's, so none of them is the server's error."""
    make_model(tmp_path, "org/m")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "org" / "a").symlink_to(tmp_path / "org" / "b")
    (tmp_path / "org" / "b").symlink_to(tmp_path / "org" / "a")
    locked = make_model(tmp_path, "locked/inner").parent
    locked.chmod(0)
    try:
        roots = LocalRoots([tmp_path])
        for name in ("loop/x", "org/a/x", "org/m/config.json/x", "locked/inner"):
            if name == "locked/inner" and os.geteuid() == 0:
                continue  # root searches any directory
            with pytest.raises(ModelNotFoundError, match="not under any --model-root"):
                roots.resolve(name)
    finally:
        locked.chmod(0o755)


def test_symlink_inside_the_root_resolves(tmp_path: Path) -> None:
    root = tmp_path / "root"
    target = make_model(root, "org/real")
    (root / "org" / "alias").symlink_to(target, target_is_directory=True)
    assert LocalRoots([root]).resolve("org/alias") == target.resolve()


def test_unknown_name_names_no_other_model(tmp_path: Path) -> None:
    # A caller whose token covers some models must not learn the others from a typo.
    make_model(tmp_path, "org/a")
    make_model(tmp_path, "org/b")
    with pytest.raises(ModelNotFoundError) as info:
        LocalRoots([tmp_path]).resolve("org/c")
    assert str(info.value) == "model 'org/c' not under any --model-root (ListModels shows what is served)"


def test_a_file_is_not_a_model(tmp_path: Path) -> None:
    make_model(tmp_path, "org/m")
    with pytest.raises(ModelNotFoundError):
        LocalRoots([tmp_path]).resolve("org/m/config.json")


def test_list_models_finds_nested_dirs(tmp_path: Path) -> None:
    make_model(tmp_path, "flat")
    make_model(tmp_path, "org/name")
    make_model(tmp_path, "org/other", "pytorch_model.bin")
    make_model(tmp_path, "team/group/deep", "model.pt")
    make_model(tmp_path, "org/name/checkpoint-100")  # inside a model: the model's business
    (tmp_path / "org" / "no-weights").mkdir()
    (tmp_path / "org" / "no-weights" / "config.json").write_text("{}")
    make_model(tmp_path, ".hidden/m")
    (tmp_path / "top.safetensors").write_bytes(b"x")  # the root itself is never a model

    models = LocalRoots([tmp_path]).list_models()

    assert list(models) == ["flat", "org/name", "org/other", "team/group/deep"]
    assert models["team/group/deep"] == tmp_path.resolve() / "team/group/deep"


def test_list_models_is_sorted_across_roots(tmp_path: Path) -> None:
    make_model(tmp_path / "a", "z/m")
    make_model(tmp_path / "b", "a/m")
    assert list(LocalRoots([tmp_path / "a", tmp_path / "b"]).list_models()) == ["a/m", "z/m"]


# ------------------------------------------------------------------------ revision


def test_local_revision_is_stable(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "org/m")
    files = [model_dir / "model.safetensors", model_dir / "config.json"]
    first = local_revision(model_dir, files)
    assert first.startswith("local-")
    assert local_revision(model_dir, files) == first
    assert local_revision(model_dir, list(reversed(files))) == first  # order of the list is irrelevant
    (model_dir / "unrelated.txt").write_text("not a served file")
    assert local_revision(model_dir, files) == first


def test_local_revision_changes_with_mtime(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "org/m")
    weights = model_dir / "model.safetensors"
    before = local_revision(model_dir, [weights])
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = local_revision(model_dir, [weights])
    assert after != before
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    # the mtime is back, but the ctime moved with it: a rewrite cannot pass for the old revision
    assert local_revision(model_dir, [weights]) not in (before, after)


def test_local_revision_changes_with_size(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "org/m")
    weights = model_dir / "model.safetensors"
    st = weights.stat()
    before = local_revision(model_dir, [weights])
    with weights.open("ab") as f:
        f.write(b"more")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: only the size differs
    assert local_revision(model_dir, [weights]) != before


def test_local_revision_depends_on_the_file_set(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "org/m")
    weights, config = model_dir / "model.safetensors", model_dir / "config.json"
    assert local_revision(model_dir, [weights]) != local_revision(model_dir, [weights, config])


def test_local_revision_is_the_same_only_for_the_same_files(tmp_path: Path) -> None:
    # Replicas on a shared volume read the same files and agree; two copies, even with the
    # same sizes and mtimes, are two revisions (inode and ctime differ).
    a, b = make_model(tmp_path / "a", "m"), make_model(tmp_path / "b", "m")
    for name in ("model.safetensors", "config.json"):
        st = (a / name).stat()
        os.utime(b / name, ns=(st.st_atime_ns, st.st_mtime_ns))
    names = ["model.safetensors", "config.json"]
    assert local_revision(a, [a / n for n in names]) != local_revision(b, [b / n for n in names])
    assert local_revision(a, [a / n for n in names]) == local_revision(a, [a / n for n in reversed(names)])
