"""The Redis job chain's runtime, whatever the stage: the frame every chunk task runs in
(tasks.py) and the job's finish step that writes its outputs (finish.py)."""
