"""Early exits: exit rules, head training, threshold calibration and segment splitting.

    rules.py      confidence / entropy / patience decisions (numpy; used by the runtime too)
    train.py      self-distillation of the exit heads with the backbone frozen
    calibrate.py  thresholds that meet an accuracy budget with the most compute saved
    segments.py   split an IR with exits into segment modules, export and build each
    data.py       the train / calib images for --train (builtin:digits or a folder)

The `insert_exit_heads` pass (passes/insert_exit_heads.py) adds the heads; the runtime side
is vitopt.segmented.
"""
