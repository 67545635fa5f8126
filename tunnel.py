"""Thin entry point: `python tunnel.py user@host` is the same as the installed `tunnel` command."""
from agent.cli import main

raise SystemExit(main())
