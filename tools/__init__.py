"""Developer tools run from a source checkout, never shipped in the wheel or the image.

`python -m tools demo` (`make demo`) runs the end-to-end demo against the tests' stand-in
upstream; `python -m tools geo-build` (`make geo`) rebuilds the demo GeoIP databases. Each
needs its optional extra (pyproject.toml: `demo`, `geo-build`; `dev` includes both).
"""
