python3 scripts/bench_train.py --cases lm_130m:768 --data synthetic --compile off --no-baseline --no-loader-probe --steps 2 --warmup 1
