"""Text in: built-in corpora, files, labelled sets, chat formatting and calibration mixes."""
