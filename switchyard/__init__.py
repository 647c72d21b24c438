"""Entry points: the ``switchyard`` command, the local stack and the test corpus.

They start and administer every service, so they sit above services/ (which
sit above shared/); nothing below imports them.
"""
