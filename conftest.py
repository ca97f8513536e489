# The suites run with the installed plugin (entry point pytest11 "llmperf"); nothing here.
