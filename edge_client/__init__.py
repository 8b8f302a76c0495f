"""The gateway runtime (sources, preprocessing, fine-tuning, MQTT session); see DESIGN.md."""
