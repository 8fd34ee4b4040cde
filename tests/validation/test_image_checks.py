import os
from pathlib import Path

from retfm.validation.images import check_images


def _problems(root: Path, paths: list[str], workers: int = 1) -> dict[str, str]:
    found = check_images(root, paths, min_side=32, workers=workers)
    return dict(zip(found["path"], found["problem"], strict=True))


def test_good_rgb_png_has_no_problem(tmp_path, png):
    png(tmp_path / "a.png")
    assert check_images(tmp_path, ["a.png"], min_side=32).empty


def test_grayscale_is_accepted_as_info(tmp_path, png):
    png(tmp_path / "g.png", mode="L")
    found = check_images(tmp_path, ["g.png"], min_side=32)
    assert found.to_dict("records") == [
        {
            "path": "g.png",
            "problem": "converted_to_rgb",
            "severity": "info",
            "detail": "mode L, converted to RGB at packing",
        }
    ]


def test_each_bad_file_gets_its_problem(tmp_path, png):
    png(tmp_path / "small.png", side=16)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    png(tmp_path / "named.png").rename(tmp_path / "named.jpg")  # PNG bytes, JPEG name
    whole = png(tmp_path / "cut.png", side=64).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "odd.xyz").write_bytes(png(tmp_path / "x.png").read_bytes())
    paths = ["missing.png", "zero.png", "text.png", "named.jpg", "cut.png", "small.png", "odd.xyz"]
    assert _problems(tmp_path, paths) == {
        "missing.png": "missing",
        "zero.png": "empty",
        "text.png": "not_an_image",
        "named.jpg": "format_mismatch",
        "cut.png": "truncated",
        "small.png": "too_small",
        "odd.xyz": "format_mismatch",
    }
    found = check_images(tmp_path, ["named.jpg", "small.png"], min_side=32)
    assert "PNG bytes named as JPEG" in found["detail"].iloc[0]
    assert "16x16" in found["detail"].iloc[1]


def test_pool_gives_the_same_answer_in_the_same_order(tmp_path, png):
    paths = []
    for i in range(300):
        name = f"{i:03d}.png"
        if i % 50 == 7:
            (tmp_path / name).write_bytes(b"")
        else:
            png(tmp_path / name, side=8 if i % 50 == 9 else 40, seed=i)
        paths.append(name)
    inline = check_images(tmp_path, paths, min_side=32, workers=1)
    pooled = check_images(tmp_path, paths, min_side=32, workers=2)
    assert len(inline) == 12
    assert inline.equals(pooled)
    assert list(pooled["path"]) == sorted(pooled["path"])


def test_a_link_out_of_the_folder_is_an_error_naming_its_target(tmp_path, png):
    root, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    outside = png(elsewhere / "x.png")
    png(root / "images" / "real.png")
    (root / "images" / "out.png").symlink_to(outside)  # a file link, out
    (root / "linked").symlink_to(elsewhere)  # a folder link on the path, out
    (root / "images" / "in.png").symlink_to("real.png")  # stays inside: fine
    (root / "images" / "dangling.png").symlink_to(elsewhere / "gone.png")  # out, and missing
    paths = ["images/out.png", "linked/x.png", "images/in.png", "images/dangling.png"]
    for decode in (True, False):
        found = check_images(root, paths, min_side=32, decode=decode)
        assert found["path"].tolist() == ["images/out.png", "linked/x.png", "images/dangling.png"]
        assert set(found["problem"]) == {"outside_folder"}
        target = os.path.realpath(outside)
        assert found["detail"].iloc[0] == f"a symbolic link leads to {target}, outside {root}"
    assert check_images(root, ["images/in.png"], min_side=32, decode=False).empty


def test_links_into_the_projects_dvc_cache_are_fine(tmp_path, png):
    """With ``dvc config cache.type symlink`` every tracked image is a link into .dvc/cache:
    outside the CSV's folder, but the project's own content-addressed copy."""
    import subprocess
    import sys

    dvc = str(Path(sys.executable).parent / "dvc")
    png(tmp_path / "data" / "site" / "images" / "a.png")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"],
                [dvc, "config", "cache.type", "symlink"], [dvc, "add", "-q", "data"]):  # fmt: skip
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    linked = tmp_path / "data" / "site" / "images" / "a.png"
    assert linked.is_symlink() and ".dvc/cache" in os.path.realpath(linked)
    assert check_images(tmp_path / "data" / "site", ["images/a.png"], min_side=32).empty
    (tmp_path / "data" / "site" / "images" / "b.png").symlink_to(tmp_path / "elsewhere.png")
    found = check_images(tmp_path / "data" / "site", ["images/b.png"], min_side=32)
    assert found["problem"].tolist() == ["outside_folder"]
