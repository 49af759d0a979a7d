python3 scripts/tune_ssd.py --profile-run 10 --shapes lm_step --layout block
