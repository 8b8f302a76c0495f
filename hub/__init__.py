"""The aggregation service (intake, strategies, rounds, registry); see DESIGN.md."""
