"""`pacsnode demo`: the whole path on loopback — Orthanc as the PACS, the node, the OHIF viewer — fed with
synthetic phantom studies, so a person sees the AI results (TID 1500 SR + SEG) in a real viewer within minutes.

Not part of the node: ``node/`` never imports this package; `demo.cli.register` adds ``demo`` to ``pacsnode``
through the ``pacsnode.commands`` entry point. Modules: `demo.common` (paths, AE titles, `DemoError`),
`demo.pacs` (Orthanc set up as the demo's PACS), `demo.viewer` (OHIF's static build with Orthanc's DICOMweb proxied
behind it on one origin), `demo.runner` (the node's config, phantoms, `Demo`), `demo.cli` (the command). Orthanc
and the node run as child processes through `peers` (the harness the tests and the benchmarks use too).

`Demo(settings)` starts the pieces and stops them by PID (also usable from tests): Orthanc with a temporary config
and its DICOMweb plugin; the node (`pacsnode serve` as a child process, Orthanc its destination); the viewer
server. `Demo.send_phantoms` writes phantom series and stores them with a real SCU; `Demo.wait_for_results` polls
Orthanc until each study has its SR and SEG. Failures to start or to get results raise `DemoError`. Every study it
makes is synthetic and every result says "not for clinical use". The OHIF build comes from ``demo/fetch-ohif.sh``
(pinned, fetched once into ``demo/.cache``), so the demo runs from a clone of the repository.
"""
