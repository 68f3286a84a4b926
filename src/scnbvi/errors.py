"""One error type for bad input, so scripts can print it as a single line."""


class InputError(ValueError):
    """Bad user input: the message names the file, the field and the fix, on one line."""

    def __init__(self, source, field, problem, fix):
        self.source, self.field, self.problem, self.fix = str(source), field, problem, fix
        super().__init__(f"{source}: {field}: {problem}; fix: {fix}")
