"""The patient's web form: server-rendered Jinja2 pages answering one Task's questionnaire (issue 15)."""
