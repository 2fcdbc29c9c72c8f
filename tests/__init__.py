"""hishrst test suite; the folders mirror the packages."""
