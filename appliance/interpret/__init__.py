"""Turn raw model outputs into a result: refusal, triage, findings, severity, zones, text."""
