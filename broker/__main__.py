"""`python -m broker --config broker.conf [--port N] [--bind ADDR] [--parent-pid PID]`."""

from broker.cli import main

raise SystemExit(main())
