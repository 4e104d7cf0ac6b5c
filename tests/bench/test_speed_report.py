"""speed.md holds two suites' sections: each rewrites its own and keeps the other's."""

from __future__ import annotations

from pathlib import Path

from bench.speed.report import ZOO_SECTION, kept_section, replace_section


def test_replace_section_keeps_what_comes_before(tmp_path: Path) -> None:
    out = tmp_path / "speed.md"
    out.write_text("# Speed\n\n## ResNet-18\n| a |\n\n" + ZOO_SECTION + "\nold zoo row\n")
    replace_section(out, ZOO_SECTION, [ZOO_SECTION, "", "new zoo row"])
    assert out.read_text().splitlines() == [
        "# Speed",
        "",
        "## ResNet-18",
        "| a |",
        "",
        ZOO_SECTION,
        "",
        "new zoo row",
    ]


def test_replace_section_appends_to_a_file_without_it(tmp_path: Path) -> None:
    out = tmp_path / "speed.md"
    out.write_text("# Speed\n| a |")
    replace_section(out, ZOO_SECTION, [ZOO_SECTION, "row"])
    assert out.read_text().splitlines() == ["# Speed", "| a |", "", ZOO_SECTION, "row"]
    replace_section(tmp_path / "new.md", ZOO_SECTION, [ZOO_SECTION])
    assert (tmp_path / "new.md").read_text() == ZOO_SECTION


def test_kept_section_is_the_heading_to_the_end(tmp_path: Path) -> None:
    out = tmp_path / "speed.md"
    assert kept_section(out, ZOO_SECTION) == []  # no file yet
    out.write_text("# Speed\n## Zoo models at 224 pixels\n" + ZOO_SECTION + "\nrow\n")
    assert kept_section(out, ZOO_SECTION) == [ZOO_SECTION, "row"]
    out.write_text("# Speed\nrow\n")
    assert kept_section(out, ZOO_SECTION) == []
