"""`python -m master.broker --config broker.conf [--port N] [--bind ADDR] [--parent-pid PID]`."""

from master.broker.cli import main

raise SystemExit(main())
