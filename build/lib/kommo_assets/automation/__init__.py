"""Schedules and sensors: the nightly runs, the request table behind the app's button, run status -> Slack."""
