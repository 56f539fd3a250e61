"""`moemesh profile`'s pieces (the command itself, its help and its flags: mesh/profile.py).

    settings.py  Settings: what one profile run measures, and how
    node.py      a real node daemon under the mesh's control-plane pieces (mesh/control.py)
    caller.py    timed ExpertCalls straight to one worker's data socket
    measure.py   the sweep, the cold starts, the CFS-period runs: samples, nothing fitted
    fit.py       samples -> expert points, transport overhead, the allocator's Profiles
    report.py    the printed tables and the period plot
    run.py       run_profile: measure, fit, write <out>/<host>/<model>.json and the PNGs
"""
