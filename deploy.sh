#!/usr/bin/env bash
# The seeds' one command: ./deploy.sh all | build | install | prompt | batch | verify | status | logs | destroy
# (see docs/workflow.md; --dry-run prints every step without running it).
exec bash "$(dirname "$0")/scripts/k3s-workflow.sh" "$@"
