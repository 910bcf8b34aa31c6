#!/usr/bin/env python3
"""Per-thread sampler of a running process (behind
bench-results/2026-11-30-100k-budget-1cpu-hog/threads.txt). Every 0.5 s it reads each thread's
state, CPU time and run-queue wait (/proc/PID/task/*/{stat,schedstat}); when PID exits it writes
the samples to OUT and, per thread, the longest stretch it was runnable but not running (its
run-queue wait grew while its CPU time did not).

Usage: scripts/thread-sampler.py PID OUT"""
import os, sys, time, collections
pid, out = sys.argv[1], sys.argv[2]
hz = os.sysconf('SC_CLK_TCK')
prev = {}
stretch = collections.defaultdict(float)
worst = collections.defaultdict(float)
rows = []
t0 = time.time()
while os.path.exists(f"/proc/{pid}"):
    now = time.time()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            st = open(f"/proc/{pid}/task/{tid}/stat").read()
            ss = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()
        except OSError:
            continue
        name = st[st.index('(')+1:st.rindex(')')]
        f = st[st.rindex(')')+2:].split()
        state, ut, stt = f[0], int(f[11]), int(f[12])
        cpu_ns, delay_ns = int(ss[0]), int(ss[1])
        key = (tid, name)
        if key in prev:
            pc, pd, pt = prev[key]
            dcpu, ddel, dt = cpu_ns - pc, delay_ns - pd, now - pt
            rows.append(f"{now-t0:.1f} {name}/{tid} {state} cpu_ms={dcpu/1e6:.0f} wait_ms={ddel/1e6:.0f} u={ut} s={stt}")
            if ddel > 0.8e9 * dt and dcpu < 0.05e9 * dt:
                stretch[key] += dt
                worst[key] = max(worst[key], stretch[key])
            else:
                stretch[key] = 0
        prev[key] = (cpu_ns, delay_ns, now)
    time.sleep(0.5)
with open(out, 'w') as fh:
    fh.write("\n".join(rows) + "\n")
    fh.write("# longest starved stretch (runnable, not running) per thread, s\n")
    for (tid, name), w in sorted(worst.items(), key=lambda x: -x[1]):
        fh.write(f"# {name}/{tid} {w:.1f}\n")
print(open(out).read().split("# longest")[1][:2000])
